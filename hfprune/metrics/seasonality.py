# Copyright hfprune contributors. Apache-2.0.
"""The seasonal period of a sampling frequency: the lag ``m`` of MASE's seasonal-naive scale.

The usual seasons of forecasting practice (the M4 and Monash conventions): a day for data sampled within a day
(hourly 24, half-hourly 48, every 15 minutes 96), a week for daily data (7), a year for weekly (52), monthly
(12) and quarterly (4) data, a week of business days (5); yearly data and steps with no such season get 1
(the naive forecast of the previous step).

Example:

```python
>>> from hfprune.metrics.seasonality import seasonal_period
>>> seasonal_period("30min"), seasonal_period("h"), seasonal_period("D"), seasonal_period("1800s")
(48, 24, 7, 48)
```
"""

from __future__ import annotations

DAY = 86400
# Calendar offsets (not fixed durations): pandas offset class name -> steps per season, for a step of one unit.
CALENDAR_PERIODS = {"Week": 52, "BusinessDay": 5, "MonthEnd": 12, "MonthBegin": 12, "QuarterEnd": 4,
                    "QuarterBegin": 4, "YearEnd": 1, "YearBegin": 1}


def seasonal_period(freq: str) -> int:
    """Steps per season for data sampled at ``freq``, a pandas offset alias (``30min``, ``h``, ``D``, ``W``, ``ME``,
    ``QE``, ``YE``, ``B``, or seconds such as ``1800s``). A step that does not divide its season gives 1; an alias
    pandas does not read raises ``ValueError`` naming it."""
    import pandas as pd
    from pandas.tseries.frequencies import to_offset

    try:
        offset = to_offset(freq)
    except (TypeError, ValueError) as err:
        raise ValueError(f"freq={freq!r} is not a pandas offset alias (e.g. 30min, h, D, W, ME): "
                         f"{str(err).splitlines()[0]}") from None
    if isinstance(offset, (pd.tseries.offsets.Tick, pd.tseries.offsets.Day)):  # a fixed step (pandas 3: Day too)
        seconds = pd.Timedelta(offset).total_seconds()
        if seconds < DAY and DAY % seconds == 0:
            return int(DAY // seconds)  # the season is a day
        return {DAY: 7, 7 * DAY: 52}.get(seconds, 1)
    per_unit = CALENDAR_PERIODS.get(type(offset).__name__)
    if per_unit is None or offset.n < 1 or per_unit % offset.n:
        return 1
    return per_unit // offset.n

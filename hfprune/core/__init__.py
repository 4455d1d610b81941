"""What a pruned model is: the plan, the architecture adapters, slicing and masking, the one walk over a model's
blocks, costs, calibration passes, and checkpoints. Imports only torch and transformers (and safetensors /
huggingface_hub for checkpoints); every other layer of hfprune builds on this one."""

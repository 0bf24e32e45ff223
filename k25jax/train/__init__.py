"""INT4 quantization-aware fine-tuning: fake-quant expert weights, the train step, data, checkpoints, export."""

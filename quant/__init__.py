"""What `example.py`'s quantization flags add to the lesson, each imported only when its flag asks for it:
AutoQuantize, a format per layer (`--quant-mode auto`, auto_quantize.py); a float8 KV cache (`--kv-cache`,
kv_cache.py); saving and restoring a calibrated model (`--save-quantized`, `--load-quantized`, save_restore.py).
quantization.py, weight_loader.py, evaluate.py and qat.py use them too."""

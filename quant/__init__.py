"""What `example.py`'s quantization flags add to the lesson, each imported only when its flag asks for it:
AutoQuantize, a format per layer (`--quant-mode auto`, auto_quantize.py); a quantized KV cache, float8 or int8
(`--kv-cache`, kv_cache.py); saving and restoring a calibrated model (`--save-quantized`, `--load-quantized`,
save_restore.py); a quantized output layer (`modelopt_quantize(..., lm_head_mode=...)`, lm_head.py). quantization.py,
weight_loader.py, evaluate.py and qat.py use them too."""

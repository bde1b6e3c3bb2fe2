"""The files this example hands to other tools, and their readers. checkpoint.py writes ModelOpt's unified Hugging
Face checkpoint (`--export-dir`); checkpoint_loader.py loads one into the Tripy model or its twin (`--model-type
EXPORT`); modelopt_hf.py teaches transformers (and so vLLM's loader checks) to read one; quant_algos.py names its
modes, without torch, for the command line's checks. onnx_export.py writes the ONNX file with explicit quantization
(`--export-onnx`); onnx_fused.py its ONNX Runtime-only flavor in fused operators (`--onnx-flavor ort`);
onnx_runtime.py runs either with ONNX Runtime; optimum_generate.py runs it with optimum, in optimum's
own environment (`python -m exports.optimum_generate`)."""

"""Where GPT-2 and its text come from: the Hugging Face Hub, a local checkpoint or the bundled model (hub.py), and
GPT-2's tokenizer built offline (tokenizer.py). The lesson (quantization.py, weight_loader.py, example.py) and every
script use them; they import only the standard library at the top, so a command line can check a model name before
torch loads."""

"""Running and measuring models beside the lesson: the PyTorch twin loaded with a model's weights and scales
(twin.py), the sampling every model shares so that one seed gives one text (sampling.py), and perplexity
(perplexity.py). evaluate.py, benchmark.py, train.py, qat.py, serve_vllm.py and the tests use them."""

"""What train.py (the bundled model's training) and quantization-aware training (qat.py, evaluate.py's QAT rows)
share: the corpus, the loss, the learning-rate schedule and a short fine-tuning loop (finetune.py)."""

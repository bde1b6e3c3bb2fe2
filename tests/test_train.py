"""train.py's corpus: prose only, and a held-out split that never overlaps the training text. Its bad options are
in tests/test_bad_input.py.

Training itself is not run here (it takes a quarter of an hour); README shows its output and the checkpoint it made
ships in bundled_model/, which tests/test_evaluate.py measures.
"""

from training import finetune as training


def test_prose_keeps_sentences_and_drops_code_and_whitespace_runs():
    docstring = (
        "Return the sum of the numbers in an iterable.\n"
        "\n"
        "    total = sum(numbers)\n"
        "\n"
        ">>> sum([1, 2])\n"
        "3\n"
        "\n"
        "Parameters:\n"
        "\n"
        "The  start value   is added\n"
        "to the total,  and defaults to zero."
    )
    assert training.prose(docstring) == (
        "Return the sum of the numbers in an iterable.\n\nThe start value is added to the total, and defaults to zero."
    )


def test_split_holds_out_whole_files_and_never_repeats_training_text():
    docstrings = {
        f"module_{i}.py": [f"Docstring number {i} of its module.", "A docstring shared by all."] for i in range(200)
    }
    train_texts, validation_texts = training.split_corpus(docstrings)
    held_out = [path for path in docstrings if training.is_heldout(path)]
    assert 0 < len(held_out) < 30  # about 5% of 200 files
    assert validation_texts == [docstrings[path][0] for path in held_out]  # the shared docstring is training text
    assert not set(train_texts) & set(validation_texts)
    assert training.split_corpus(docstrings) == (train_texts, validation_texts)  # the same split on every run

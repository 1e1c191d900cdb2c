"""A model trained on data without questions has no answer vocabulary: `crossmodal answer` on
it is a one-line error, and the Python API says the same."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.config import model_config
from model.io import SavedModel, save
from model.multimodal import CrossModalModel
from model.tokenizer import Tokenizer
from pipelines.apps.api import CrossModal, InputError
from pipelines.cli import main


@pytest.fixture
def no_answers(tmp_path):
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["a pug in a bear costume", "the birch canoe slid on the smooth planks"], 300)
    model = CrossModalModel(model_config("tiny", vocab_size=tokenizer.vocab_size))
    return save(SavedModel(model.eval(), tokenizer, answers=[]), tmp_path / "model")


def test_answer_on_a_model_without_an_answer_vocabulary_is_one_line(no_answers, tmp_path, capsys):
    image = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (200, 220, 240)).save(image)
    assert main(["answer", str(no_answers), str(image), "what is it?"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("this model was trained without answers (no VQA head labels)") and "\n" not in err
    with pytest.raises(InputError, match="trained without answers"):
        CrossModal.load(str(no_answers)).answer(image, "what is it?")

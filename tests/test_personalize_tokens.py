"""The concept's word: one new token that every prompt keeps through PixArt's caption cleaning."""
import pytest
from transformers import AutoTokenizer, T5EncoderModel

from pixart.encoders import clean_caption, make_tiny_t5
from pixart.errors import PixArtError
from pixart.personalize.tokens import add_concept_token, check_new_name


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5", d_model=8)
    return AutoTokenizer.from_pretrained(folder), T5EncoderModel.from_pretrained(folder)


def test_a_new_word_becomes_one_token_that_survives_cleaning(t5):
    tokenizer, model = t5
    token = add_concept_token(tokenizer, model, "zork")
    ids = tokenizer(clean_caption("A photo of a ZORK, on the left")).input_ids
    assert ids.count(token) == 1 and model.get_input_embeddings().weight.shape[0] > token


@pytest.mark.parametrize("name, message", [
    ("Zork", "one lower-case word of letters and digits"),
    ("my_cat", "one lower-case word of letters and digits"),  # "_" is a space in captions with more than 3 of "-_"
    ("sks1234", "turns it into ''"),  # the cleaning's product-code rule: 1-3 letters and 3+ digits
    ("jpegcat", "turns it into 'cat'"),  # its image-format words
])
def test_new_names_a_prompt_would_lose_are_refused(name, message):
    with pytest.raises(PixArtError, match=message):
        check_new_name(name)
    check_new_name("zork")


def test_concepts_already_made_still_load_and_vocabulary_words_are_refused(t5):
    tokenizer, model = t5
    assert add_concept_token(tokenizer, model, "my_cat") >= 0  # a concept file of an earlier version
    with pytest.raises(PixArtError, match="already a word"):
        add_concept_token(tokenizer, model, "the")

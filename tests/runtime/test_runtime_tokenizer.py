"""The runtime's CLIP tokenizer against transformers' CLIPTokenizer on the same files."""

import pytest

transformers = pytest.importorskip("transformers")

from bf.models.shipped import shipped_model_dir  # noqa: E402
from bf.runtime.tokenizer import ClipTokenizer  # noqa: E402

PROMPTS = [
    "a red circle above a blue square",
    "A photo of an astronaut riding a horse on Mars, 4k, highly detailed!!!",
    "  multiple   spaces\tand\nnewlines  ",
    "it's a cat's toy; they're here, we've got it, I'm sure you'll see, he'd go",
    "''s !'s 'x it''s",
    "numbers 1234567 and 3.14159, 2nd place, 10x",
    "Crème brûlée, naïve café, Straße, ΑΒΓ, Добрый день, 日本語のテキスト",
    'emoji 🐱🚀 and symbols @#$%^&*()_+-=[]{}|\\:";<>?/~`',
    "decomposed e\u0301 and composed é",
    "<|startoftext|>inside<|endoftext|> tokens",
    "",
    "x" * 300,
    " ".join(["word"] * 100),
]


@pytest.mark.parametrize("files", ["vocab.json + merges.txt", "tokenizer.json (as bf export saves it)"])
def test_token_ids_match_transformers(files, tmp_path):
    directory = shipped_model_dir() / "tokenizer"
    ref = transformers.CLIPTokenizer.from_pretrained(directory)
    if files.startswith("tokenizer.json"):
        ref.save_pretrained(tmp_path)
        assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "merges.txt").exists()
        directory = tmp_path
    ours = ClipTokenizer(directory)
    for prompt in PROMPTS:
        want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        got, dropped = ours.encode(prompt)
        assert got == want, prompt
        full = ref(prompt).input_ids
        assert dropped == max(0, len(full) - 77), prompt


def test_bad_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a CLIP tokenizer directory"):
        ClipTokenizer(tmp_path)

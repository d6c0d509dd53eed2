"""The built-in workload: tiny models of each architecture round-trip through from_pretrained, the
built-in model is built once and reused, and the shipped text sample loads."""


import pytest

from autobatch import builtin
from autobatch.errors import AutobatchError

ARCHS = ["llama", "gpt2", "opt", "qwen2"]
TEXT = "Hello, world!\n\tNaïve café — “quoted” text, 3 × 4 = 12; 日本語 too.\r\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_back(tiny_model_dir, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.max_position_embeddings >= 2048
    assert 100_000 < model.num_parameters() < 1_000_000
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_tiny_model_is_seeded(tmp_path):
    import torch
    from safetensors.torch import load_file

    before = torch.random.get_rng_state()
    a = load_file(builtin.save_tiny_model(tmp_path / "a") / "model.safetensors")
    b = load_file(builtin.save_tiny_model(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone


def test_overrides_reach_the_config(tmp_path):
    from transformers import AutoConfig

    path = builtin.save_tiny_model(tmp_path, "gpt2", hidden_size=32, num_hidden_layers=1)
    config = AutoConfig.from_pretrained(path)
    assert (config.n_embd, config.n_layer) == (32, 1)


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="arch 'bert'"):
        builtin.save_tiny_model(tmp_path, "bert")


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips(tiny_model_dir, arch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT.encode())  # one token per UTF-8 byte: nothing is unknown
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer("abc")["input_ids"] == [97, 98, 99]  # the same ids whichever tokenizer class loads it
    specials = [getattr(tokenizer, f"{name}_token_id") for name in ("unk", "pad", "bos", "eos")]
    assert None not in specials and len(set(specials)) == 4
    assert len(tokenizer) == 260


def test_builtin_model_dir_is_built_once(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("AUTOBATCH_CACHE", str(tmp_path))
    first = builtin.builtin_model_dir()
    assert first == tmp_path / builtin.BUILTIN_MODEL_NAME
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert builtin.builtin_model_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [builtin.BUILTIN_MODEL_NAME]  # no temp dir left behind
    assert first.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0o700
    assert AutoModelForCausalLM.from_pretrained(first).config.model_type == "llama"


def test_builtin_model_dir_refuses_a_foreign_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE", str(tmp_path))
    (tmp_path / builtin.BUILTIN_MODEL_NAME).mkdir()
    (tmp_path / builtin.BUILTIN_MODEL_NAME / "notes.txt").write_text("not a model")
    with pytest.raises(AutobatchError, match="exists but holds no model"):
        builtin.builtin_model_dir()
    assert [p.name for p in tmp_path.iterdir()] == [builtin.BUILTIN_MODEL_NAME]


def test_builtin_dataset_loads():
    from datasets import load_dataset

    path = builtin.builtin_dataset_path()
    dataset = load_dataset("json", data_files=str(path), split="train")
    lengths = [len(text) for text in dataset["text"]]
    assert dataset.column_names == ["text"]
    assert 250 <= len(dataset) <= 400
    assert min(lengths) >= 20 and max(lengths) <= 600 and max(lengths) > 512

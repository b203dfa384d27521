"""groups on transformers models (state dicts saved as the modules hold them): the parameters go to decay
or no_decay as training code sorts them by module (biases and the weights of normalisation modules without
decay), and transformers' buffers named like biases (DeepSeek-V3's e_score_correction_bias, BART's
final_logits_bias) are buffers, in neither group; gpt-oss's stacked expert biases are biases."""

import json

import pytest
from helpers import register_input, run
from safetensors.torch import save_file

import layer_models as lm


def expected_groups(model) -> dict[str, list[str]]:
    """decay / no_decay / buffers from the modules: a parameter whose name holds 'bias' (as the Trainer's
    get_decay_parameter_names exempts it: T5's relative_attention_bias too) or held by a module whose class
    is a norm goes without decay; a persistent buffer is a buffer."""
    modules = dict(model.named_modules())
    groups = {"decay": set(), "no_decay": set(), "buffers": set(model.state_dict()) - set(dict(model.named_parameters(remove_duplicate=False)))}
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner = modules[name.rpartition(".")[0]]
        plain = "bias" not in name.lower() and "norm" not in type(owner).__name__.lower()
        groups["decay" if plain else "no_decay"].add(name)
    return {k: sorted(v) for k, v in groups.items()}


@pytest.mark.parametrize("build", [lambda: lm.moe("dsv3"), lm.bart, lm.gpt_oss, lm.t5, lambda: lm.moe("qwen2moe")],
                         ids=["deepseek-v3", "bart", "gpt-oss", "t5", "qwen2-moe"])
def test_groups_sort_parameters_as_their_modules_say(request, tmp_path, build):
    model = build()
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone() for k, v in model.state_dict().items()}, path)  # tied embeddings stored apart, by every name
    register_input(request, path)
    found = json.loads(run("groups", path, "--json").stdout)
    assert {k: sorted(found[k]) for k in ("decay", "no_decay", "buffers")} == expected_groups(model)

"""Ranges and alternatives in globs ({20..23}, {q,k,v}): expanded as bash expands them, in every
pattern option (-p, -x, groups' rules, --from/--to mappings); each expansion must match."""

import subprocess

import pytest
import torch
from helpers import bits, load_torch, register_input, run

from paramsurgeon.selection import expand, matches, wildcard_map


@pytest.mark.parametrize("glob", ["layers.{20..23}.*", "*.{q,k,v}_proj.weight", "a{01..10..3}b", "x{3..1}",
                                  "{a,b{1..2}}c", "n{-2..2}", "{x,y}.{1..2}", "plain.*", "lit{b}"])
def test_expansion_is_what_bash_gives(glob):
    shell = subprocess.run(["bash", "-c", f"printf '%s\\n' {glob}"], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}, cwd="/").stdout.split()
    if "*" in glob:  # bash would expand the * against files: compare with the * quoted
        shell = subprocess.run(["bash", "-c", f"printf '%s\\n' {glob.replace('*', chr(39) + '*' + chr(39))}"],
                               capture_output=True, text=True).stdout.split()
    assert expand(glob) == shell


def test_matching_and_literal_braces():
    assert matches("layers.21.mlp.w", "layers.{20..23}.*") and not matches("layers.24.mlp", "layers.{20..23}.*")
    assert matches("h.k_proj.weight", "*.{q,k,v}_proj.weight")
    assert not matches("h.o_proj.weight", "*.{q,k,v}_proj.weight")
    assert matches("a{b}", "a{b}") and matches("{", "[{]")


def test_mappings_pair_braces_in_order():
    names = [f"layers.{i}.w" for i in range(8)]
    assert wildcard_map("layers.{0..3}.*", "layers.{4..7}.*", names) == {f"layers.{i}.w": f"layers.{i + 4}.w"
                                                                         for i in range(4)}
    assert wildcard_map("layers.{0,1}.*", "blocks.*", names) == {"layers.0.w": "blocks.w", "layers.1.w": "blocks.w"}
    with pytest.raises(Exception, match="expands to 2 globs but 'b.{1..3}' to 3"):
        wildcard_map("a.{1,2}", "b.{1..3}", names)


@pytest.fixture
def bert(request, tmp_path):
    torch.manual_seed(0)
    state = {}
    for i in range(12):
        state[f"encoder.layer.{i}.attention.self.query.weight"] = torch.randn(8, 8)
        state[f"encoder.layer.{i}.attention.self.query.bias"] = torch.randn(8)
    path = tmp_path / "bert.pt"
    torch.save(state, path)
    register_input(request, path)
    return path, state


def test_ranges_in_patterns_excludes_and_mappings(bert, tmp_path):
    path, state = bert
    out = tmp_path / "z.pt"
    result = run("zero", path, "-p", "encoder.layer.{8..11}.*", "-x", "*.{query.bias}", "-o", out)
    assert result.exit_code == 2 and "no name has a part '{query'" in result.stderr  # {one} is literal, as in bash
    result = run("zero", path, "-p", "encoder.layer.{8..11}.*", "-x", "*.{query,key}.bias", "--allow-empty", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_torch(out)
    for name, value in state.items():
        layer = int(name.split(".")[2])
        changed = layer >= 8 and name.endswith("weight")
        assert bits(after[name]) == bits(torch.zeros_like(value) if changed else value), name
    result = run("copy", path, "--from", "encoder.layer.{0..1}.*", "--to", "encoder.layer.{10..11}.*", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_torch(out)
    assert bits(after["encoder.layer.11.attention.self.query.bias"]) == \
        bits(state["encoder.layer.1.attention.self.query.bias"])


def test_an_expansion_that_matches_nothing_is_an_error(bert, tmp_path):
    path, _ = bert
    out = tmp_path / "z.pt"
    result = run("zero", path, "-p", "encoder.layer.{10..13}.*", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert "--pattern 'encoder.layer.{10..13}.*': 'encoder.layer.12.*', 'encoder.layer.13.*' match no tensor" in \
        result.stderr
    result = run("zero", path, "-p", "encoder.layer.{10..11}.*", "-x", "*.{bias,biass}", "-o", out)
    assert result.exit_code == 2 and "--exclude '*.{bias,biass}': '*.biass' excludes nothing" in result.stderr
    assert run("zero", path, "-p", "encoder.layer.{10..13}.*", "--allow-empty", "-o", out).exit_code == 0
    result = run("zero", path, "-p", "layers.{0..99999999}", "-o", out)
    assert result.exit_code == 2 and "more than 10,000" in result.stderr


@pytest.mark.parametrize("command", ["rename", "copy"])
def test_a_mapping_expansion_that_matches_nothing_is_an_error(bert, tmp_path, command):
    path, _ = bert
    out = tmp_path / "m.pt"
    result = run(command, path, "--from", "encoder.layer.{11..12}.*", "--to", "encoder.layer.{0..1}.*", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert f"{command}: --from 'encoder.layer.{{11..12}}.*': 'encoder.layer.12.*' matches no tensor" in result.stderr

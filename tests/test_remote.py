"""Remote checkpoints (issue 28): https:// and hf:// read through ranged requests against a real
HTTP server on 127.0.0.1 (tests/remote_server.py), which counts the requests and the file bytes
it sends. Ground truth: the same commands on the local copy of the same files."""

import json
import os
import shutil
import socket

import pytest
import torch
from helpers import run
from remote_server import Server
from safetensors.torch import load_file, save_file

SHARDS = 3
BIG = (256, 256)  # 256 KiB of float32 per tensor: a shard read whole would break the byte budget


def _sharded(folder, seed=0, scale=1.0):
    """A hub-named 3-shard safetensors checkpoint with config.json; returns its tensors."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.weight": torch.randn(*BIG, generator=generator) * scale for i in range(SHARDS * 2)}
    names = list(tensors)
    weight_map = {}
    for s in range(SHARDS):
        shard = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {n: tensors[n] for n in names[2 * s:2 * s + 2]}
        save_file(part, os.path.join(folder, shard))
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "tie_word_embeddings": False}, f)
    return tensors


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    _sharded(root / "files" / "model")
    _sharded(root / "hub" / "org" / "model" / "main", seed=0)
    _sharded(root / "hub" / "org" / "model" / "v1", seed=0, scale=1.5)
    served = Server(root)
    served.root_path = root
    yield served
    served.close()


@pytest.fixture
def fresh(server, monkeypatch):
    server.reset()
    server.mode, server.token, server.redirect_to, server.signed, server.delay = None, None, None, None, 0.0
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    return server


def _local(server, *parts):
    return str(server.root_path.joinpath(*parts))


def _header_budget(folder) -> int:
    """The bytes header-only work may read: the index, config.json, and each shard's header plus 64 KiB."""
    total = os.path.getsize(os.path.join(folder, "model.safetensors.index.json"))
    total += os.path.getsize(os.path.join(folder, "config.json"))
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                total += 8 + int.from_bytes(f.read(8), "little") + (64 << 10)
    return total


def _without_source(document: dict) -> dict:
    return {k: v for k, v in document.items() if k != "source"}


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_header_only_inspect_over_https_stays_within_the_request_and_byte_budget(fresh):
    url = f"{fresh.url}/files/model/model.safetensors.index.json"
    got = run("inspect", "--no-stats", "--json", url)
    assert got.exit_code == 0, got.stderr
    assert len(fresh.requests) <= SHARDS + 3, fresh.requests
    assert fresh.sent <= _header_budget(_local(fresh, "files", "model")), fresh.sent
    expected = run("inspect", "--no-stats", "--json", _local(fresh, "files", "model", "model.safetensors.index.json"))
    assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))
    assert json.loads(got.stdout)["source"] == url


def test_statistics_over_https_are_those_of_the_local_file(fresh):
    shard = "model-00002-of-00003.safetensors"
    got = run("inspect", "--json", f"{fresh.url}/files/model/{shard}")
    assert got.exit_code == 0, got.stderr
    expected = run("inspect", "--json", _local(fresh, "files", "model", shard))
    assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))
    assert fresh.sent >= os.path.getsize(_local(fresh, "files", "model", shard)) - (64 << 10)


def test_a_remote_against_and_a_local_copy_from_a_remote_source(fresh, tmp_path):
    local = _local(fresh, "files", "model")
    url = f"{fresh.url}/files/model/model.safetensors.index.json"
    assert run("diff", local, url).exit_code == 0
    assert run("diff", local, "hf://org/model@v1").exit_code == 1
    out = tmp_path / "out.safetensors"
    shard = "model-00001-of-00003.safetensors"
    made = run("copy", os.path.join(local, shard), "--source", f"hf://org/model@v1/{shard}", "-o", out)
    assert made.exit_code == 0, made.stderr
    expected = load_file(_local(fresh, "hub", "org", "model", "v1", shard))
    got = load_file(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_remote_output_is_refused_by_name(fresh, tmp_path):
    local = _local(fresh, "files", "model", "model-00001-of-00003.safetensors")
    got = run("zero", local, "--regex", "model.layers.0.weight", "-o", f"{fresh.url}/files/out.safetensors")
    _one_line_error(got, f"{fresh.url}/files/out.safetensors", "local")


def test_a_missing_file_is_one_line(fresh):
    url = f"{fresh.url}/files/model/nothing.safetensors"
    _one_line_error(run("inspect", url), url, "404")


def test_a_missing_shard_is_named(fresh, tmp_path):
    folder = fresh.root_path / "files" / "broken"
    shutil.copytree(fresh.root_path / "files" / "model", folder, dirs_exist_ok=True)
    os.remove(folder / "model-00002-of-00003.safetensors")
    _one_line_error(run("inspect", "--no-stats", f"{fresh.url}/files/broken/model.safetensors.index.json"),
                    "model-00002-of-00003.safetensors", "missing")


def test_a_refused_connection_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.safetensors"
    _one_line_error(run("inspect", url), url, "cannot connect")


def test_a_server_that_ignores_range_is_refused_unless_download_is_asked(fresh):
    fresh.mode = "ignore-range"
    shard = f"{fresh.url}/files/model/model-00001-of-00003.safetensors"
    _one_line_error(run("inspect", "--no-stats", shard), shard, "--download")
    got = run("inspect", "--json", "--download", shard)
    assert got.exit_code == 0, got.stderr
    expected = run("inspect", "--json", _local(fresh, "files", "model", "model-00001-of-00003.safetensors"))
    assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))


def test_a_truncated_response_is_one_line_and_nothing_is_written(fresh, tmp_path):
    fresh.mode = "truncate"
    shard = f"{fresh.url}/files/model/model-00001-of-00003.safetensors"
    out = tmp_path / "out.safetensors"
    got = run("copy", _local(fresh, "files", "model", "model-00002-of-00003.safetensors"), "--source", shard,
              "--from", "model.layers.0.weight", "--to", "model.layers.2.weight", "-o", out)
    _one_line_error(got, shard, "cut short")
    assert not out.exists()


def test_access_denied_says_a_token_is_needed_and_never_prints_it(fresh, monkeypatch):
    fresh.token = "right-token"
    url = f"{fresh.url}/files/model/model-00001-of-00003.safetensors"
    _one_line_error(run("inspect", url), url, "token")
    monkeypatch.setenv("HF_TOKEN", "wrong-token-value")
    got = run("inspect", "--no-stats", "hf://org/model")
    _one_line_error(got, "hf://org/model", "token", "HF_TOKEN")
    assert "wrong-token-value" not in got.stderr + got.stdout
    monkeypatch.setenv("HF_TOKEN", "right-token")
    got = run("inspect", "--no-stats", "hf://org/model")
    assert got.exit_code == 0, got.stderr
    assert "right-token" not in got.stderr + got.stdout


def test_header_only_inspect_of_a_hub_repository_stays_within_budget(fresh):
    got = run("inspect", "--no-stats", "--json", "hf://org/model")
    assert got.exit_code == 0, got.stderr
    assert len(fresh.requests) <= SHARDS + 3, fresh.requests
    assert fresh.sent <= _header_budget(_local(fresh, "hub", "org", "model", "main")), fresh.sent
    expected = run("inspect", "--no-stats", "--json", _local(fresh, "hub", "org", "model", "main"))
    assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))


def test_diff_of_two_hub_revisions_is_the_diff_of_their_files(fresh):
    got = run("diff", "--json", "hf://org/model@v1", "hf://org/model")
    expected = run("diff", "--json", _local(fresh, "hub", "org", "model", "v1"),
                   _local(fresh, "hub", "org", "model", "main"))
    assert got.exit_code == expected.exit_code == 1, got.stderr
    strip = lambda d: {k: v for k, v in d.items() if k not in ("a", "b", "source")}  # noqa: E731
    assert strip(json.loads(got.stdout)) == strip(json.loads(expected.stdout))


def test_a_missing_hub_repository_or_revision_is_one_line(fresh):
    _one_line_error(run("inspect", "hf://gpt2"), "hf://gpt2", "hf://ORG/REPO")
    _one_line_error(run("inspect", "hf://org/nothing"), "hf://org/nothing", "404")
    _one_line_error(run("inspect", "hf://org/model@v9"), "hf://org/model@v9", "404")


def test_hf_without_huggingface_hub_names_the_extra(fresh, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    _one_line_error(run("inspect", "hf://org/model"), "paramsurgeon[hub]")


def test_a_value_reading_command_shows_the_bytes_it_fetches(fresh):
    from helpers import run_on_terminal

    url = f"{fresh.url}/files/model/model.safetensors.index.json"
    code, shown, _ = run_on_terminal("inspect", url, terminal=("stderr",), env={"PARAMSURGEON_PROGRESS_DELAY": "0"})
    assert code == 0
    assert b"reading" in shown and b"1.6 MB" in shown, shown  # the 6 tensors' 1,572,864 bytes
    assert fresh.sent >= 6 * 256 * 256 * 4


def test_check_finds_what_a_remote_index_and_its_shards_disagree_on(fresh):
    """check on a hub repository whose index names a shard that is missing and a tensor no shard holds,
    and whose shards hold a tensor the index omits: every problem is named, as for the local copy."""
    folder = fresh.root_path / "hub" / "org" / "broken" / "main"
    shutil.copytree(fresh.root_path / "hub" / "org" / "model" / "main", folder, dirs_exist_ok=True)
    os.remove(folder / "model-00003-of-00003.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00003.safetensors"
    del index["weight_map"]["model.layers.2.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    got = run("check", "--json", "hf://org/broken")
    expected = run("check", "--json", str(folder))
    assert got.exit_code == expected.exit_code == 1, got.stderr
    shards = lambda doc: next(r for r in json.loads(doc)["rules"] if r["rule"] == "shards")  # noqa: E731
    assert shards(got.stdout) == shards(expected.stdout)
    messages = " ".join(v["message"] for v in shards(got.stdout)["violations"])
    assert "model-00003-of-00003.safetensors is missing" in messages
    assert "does not hold it" in messages and "lists it nowhere" in messages


def test_check_complete_alone_reads_headers_and_sizes_only(fresh):
    got = run("check", "--complete", "hf://org/model")
    assert got.exit_code == 0, got.stdout + got.stderr
    assert "ok   shards" in got.stdout and "finite" not in got.stdout
    assert len(fresh.requests) <= SHARDS + 3, fresh.requests
    assert fresh.sent <= _header_budget(_local(fresh, "hub", "org", "model", "main")), fresh.sent


@pytest.fixture(scope="module")
def s3_server(server):
    """moto's S3 server on 127.0.0.1 with bucket 'runs' holding the sharded checkpoint under 'step1/';
    it counts the requests it answers and the object bytes it sends."""
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto.endpoint, moto.requests, moto.sent = f"http://{host}:{port}", [], [0]
    app = moto._server.app

    def counting(environ, start_response):
        moto.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        for chunk in app(environ, start_response):
            if environ["REQUEST_METHOD"] == "GET":
                moto.sent[0] += len(chunk)
            yield chunk

    import boto3

    client = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="runs")
    folder = server.root_path / "files" / "model"
    for name in os.listdir(folder):
        client.upload_file(str(folder / name), "runs", f"step1/{name}")
    moto.client = client
    moto._server.app = counting
    yield moto
    moto.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(name, value)
    s3_server.requests.clear()
    s3_server.sent[0] = 0
    return s3_server


def test_header_only_inspect_on_s3_stays_within_budget(s3, server):
    got = run("inspect", "--no-stats", "--json", "s3://runs/step1/model.safetensors.index.json")
    assert got.exit_code == 0, got.stderr
    assert len(s3.requests) <= SHARDS + 3, s3.requests
    assert s3.sent[0] <= _header_budget(_local(server, "files", "model")), s3.sent
    expected = run("inspect", "--no-stats", "--json", _local(server, "files", "model", "model.safetensors.index.json"))
    assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))


def test_values_from_s3_are_the_local_ones(s3, server):
    got = run("diff", "s3://runs/step1/model.safetensors.index.json", _local(server, "files", "model"))
    assert got.exit_code == 0, got.stdout + got.stderr
    assert s3.sent[0] >= SHARDS * 2 * 256 * 256 * 4


def test_check_complete_on_s3_names_a_missing_shard(s3, server):
    s3.client.copy_object(Bucket="runs", Key="step2/model.safetensors.index.json",
                          CopySource={"Bucket": "runs", "Key": "step1/model.safetensors.index.json"})
    for shard in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        s3.client.copy_object(Bucket="runs", Key=f"step2/{shard}", CopySource={"Bucket": "runs", "Key": f"step1/{shard}"})
    got = run("check", "--complete", "s3://runs/step2/model.safetensors.index.json")
    assert got.exit_code == 1, got.stdout + got.stderr
    assert "shard model-00002-of-00003.safetensors is missing (2 tensors listed for it)" in got.stdout


def test_s3_errors_are_one_line(s3, monkeypatch, tmp_path):
    _one_line_error(run("inspect", "s3://runs/step1/nothing.safetensors"), "s3://runs/step1/nothing.safetensors",
                    "not found")
    _one_line_error(run("inspect", "s3://nobucket/model.safetensors"), "s3://nobucket/model.safetensors", "not found")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    got = run("inspect", "s3://runs/step1/model.safetensors.index.json")
    _one_line_error(got, "s3://runs/step1/model.safetensors.index.json", "credentials")


def test_s3_without_s3fs_names_the_extra(s3, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)
    _one_line_error(run("inspect", "s3://runs/step1/model.safetensors.index.json"), "paramsurgeon[s3]")


def test_merge_lora_takes_an_adapter_from_the_hub_or_by_its_config_url(fresh, tmp_path):
    from lora_models import llama, make_adapter, state

    model = llama()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in state(model).items()}, base)
    adapter = make_adapter(model, fresh.root_path / "hub" / "org" / "adapter" / "main", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    shutil.copytree(adapter, fresh.root_path / "files" / "adapter", dirs_exist_ok=True)
    expected = run("merge-lora", base, adapter, "-o", tmp_path / "local.safetensors")
    assert expected.exit_code == 0, expected.stderr
    for given in ("hf://org/adapter", f"{fresh.url}/files/adapter/adapter_config.json"):
        got = run("merge-lora", base, given, "-o", tmp_path / "remote.safetensors")
        assert got.exit_code == 0, got.stderr
        ours, truth = load_file(tmp_path / "remote.safetensors"), load_file(tmp_path / "local.safetensors")
        assert ours.keys() == truth.keys() and all(torch.equal(ours[n], truth[n]) for n in truth)


def test_groups_and_report_read_a_hub_repository(fresh, tmp_path):
    local = _local(fresh, "hub", "org", "model", "main")
    assert run("groups", "hf://org/model").stdout == run("groups", local).stdout
    got = run("report", "hf://org/model", "--against", "hf://org/model@v1", "-o", tmp_path / "report.html")
    assert got.exit_code == 0, got.stderr
    assert "6 tensors" in got.stdout + got.stderr


def test_https_certificates_are_verified_against_the_bundle_the_environment_names(server, tmp_path, monkeypatch):
    from remote_server import self_signed

    certificate = self_signed(tmp_path)
    secure = Server(server.root_path, certificate)
    try:
        url = f"{secure.url}/files/model/model.safetensors.index.json"
        assert url.startswith("https://127.0.0.1:")
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        _one_line_error(run("inspect", "--no-stats", url), url, "cannot connect", "certificate")
        monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
        got = run("inspect", "--no-stats", url)
        assert got.exit_code == 0, got.stderr
        assert "6 tensors" in got.stdout
    finally:
        secure.close()


def test_a_remote_checkpoint_written_locally_carries_its_config(fresh, tmp_path):
    got = run("convert", "hf://org/model", "-o", tmp_path / "local")
    assert got.exit_code == 0, got.stderr
    assert "only config.json is carried" in got.stderr
    folder = fresh.root_path / "hub" / "org" / "model" / "main"
    assert (tmp_path / "local" / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    for shard in (n for n in os.listdir(folder) if n.endswith(".safetensors")):
        ours, theirs = load_file(tmp_path / "local" / shard), load_file(folder / shard)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_merge_of_two_hub_revisions_is_the_merge_of_their_files(fresh, tmp_path):
    main, v1 = (_local(fresh, "hub", "org", "model", r) for r in ("main", "v1"))
    expected = run("merge", main, v1, "-o", tmp_path / "local")
    got = run("merge", "hf://org/model", "hf://org/model@v1", "-o", tmp_path / "remote")
    assert expected.exit_code == got.exit_code == 0, got.stderr
    for shard in (n for n in os.listdir(main) if n.endswith(".safetensors")):
        ours, truth = load_file(tmp_path / "remote" / shard), load_file(tmp_path / "local" / shard)
        assert ours.keys() == truth.keys() and all(torch.equal(ours[n], truth[n]) for n in truth)
    first = load_file(os.path.join(main, "model-00001-of-00003.safetensors"))["model.layers.0.weight"]
    merged = load_file(tmp_path / "remote" / "model-00001-of-00003.safetensors")["model.layers.0.weight"]
    assert torch.allclose(merged, first * 1.25)  # v1 is main times 1.5: their average is 1.25 times main


def test_a_torch_file_over_https_reads_as_the_local_one(fresh):
    path = fresh.root_path / "files" / "model.pt"
    generator = torch.Generator().manual_seed(3)
    torch.save({"model": {"w": torch.randn(300, 300, generator=generator), "b": torch.zeros(300)}, "step": 7}, path)
    for flags in (["--no-stats"], []):
        fresh.reset()
        got = run("inspect", "--json", *flags, f"{fresh.url}/files/model.pt")
        assert got.exit_code == 0, got.stderr
        expected = run("inspect", "--json", *flags, path)
        assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))
        if flags:
            assert fresh.sent < os.path.getsize(path) / 2  # the archive's directory and pickle, not its values


def test_two_loaders_never_share_what_they_looked_up(fresh, tmp_path):
    """A library user holding two loaders: what the first opened is not the second's answer when
    the file has changed since (each loader keeps its own remote lookups)."""
    from paramsurgeon.formats.loader import Loader

    path = fresh.root_path / "files" / "changing.safetensors"
    save_file({"a": torch.zeros(4)}, path)
    url = f"{fresh.url}/files/changing.safetensors"
    first, second = Loader(), Loader()
    assert list(first.checkpoint(url).tensors) == ["a"]
    save_file({"b": torch.ones(8), "c": torch.ones(2)}, path)
    assert sorted(second.checkpoint(url).tensors) == ["b", "c"]
    assert first.checkpoint(url).tensors["a"].shape == (4,)  # the first keeps what it read


def test_a_hub_redirect_is_followed_once_per_file(fresh, monkeypatch):
    """The hub answers each weight file with a redirect to its CDN (a presigned address): each
    shard pays that once, its later reads go to the CDN at once; the token stays with the hub."""
    cdn = Server(fresh.root_path)
    try:
        fresh.redirect_to = cdn.url
        monkeypatch.setenv("HF_TOKEN", "hub-only-token")
        got = run("inspect", "--json", "hf://org/model")
        assert got.exit_code == 0, got.stderr
        expected = run("inspect", "--json", _local(fresh, "hub", "org", "model", "main"))
        assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))
        resolved = [r for r in fresh.requests if "/resolve/" in r and ".safetensors" in r and ".json" not in r]
        assert len(resolved) == SHARDS == len(set(resolved)), fresh.requests
        assert len(cdn.requests) >= 3 * SHARDS, cdn.requests  # each shard's header and its two tensors
        assert not any(cdn.authorizations), cdn.authorizations  # the token stayed with the hub
        assert all(a == "Bearer hub-only-token" for a in fresh.authorizations)
        fresh.reset()
        cdn.reset()
        got = run("inspect", "--no-stats", "hf://org/model")
        assert got.exit_code == 0, got.stderr
        assert len(fresh.requests) + len(cdn.requests) <= 3 + 2 * SHARDS, (fresh.requests, cdn.requests)
    finally:
        fresh.redirect_to = None
        cdn.close()


def test_a_presigned_index_url_asks_its_shards_with_its_query(fresh):
    """An index at a presigned address (a signature in the query, slashes and all): its shards and
    config.json are asked in the same directory with the same query, and read as the local copy."""
    fresh.signed = "s3cr3t"
    query = "X-Amz-Credential=AKIA/20261206/us-east-1/s3/aws4_request&sig=s3cr3t"
    url = f"{fresh.url}/files/model/model.safetensors.index.json?{query}"
    got = run("inspect", "--json", url)
    assert got.exit_code == 0, got.stderr
    expected = run("inspect", "--json", _local(fresh, "files", "model", "model.safetensors.index.json"))
    assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))
    assert f"/files/model/model-00002-of-00003.safetensors?{query}" in fresh.requests, fresh.requests
    assert f"/files/model/config.json?{query}" in fresh.requests, fresh.requests
    complete = run("check", "--complete", url)
    assert complete.exit_code == 0 and "ok   shards" in complete.stdout, complete.stdout + complete.stderr


def test_shard_headers_are_fetched_side_by_side(fresh):
    """A distant server (each reply 0.2 s late): the shards' first blocks are asked at once, not
    one shard after another, with no more requests than the budget."""
    fresh.delay = 0.2
    got = run("inspect", "--no-stats", "hf://org/model")
    assert got.exit_code == 0, got.stderr
    assert fresh.most_at_once == SHARDS, fresh.requests
    assert len(fresh.requests) <= SHARDS + 3, fresh.requests


def test_an_expired_cdn_address_is_asked_of_the_hub_again(fresh):
    """The CDN address a hub file was redirected to expires (403) while the file is read: the
    file is asked of the hub again, and its values are read whole."""
    cdn = Server(fresh.root_path)
    try:
        fresh.redirect_to, cdn.signature_uses = cdn.url, 2
        got = run("inspect", "--json", "hf://org/model")
        assert got.exit_code == 0, got.stderr
        expected = run("inspect", "--json", _local(fresh, "hub", "org", "model", "main"))
        assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))
        resolved = [r for r in fresh.requests if "/resolve/" in r and ".json" not in r]
        assert len(resolved) == 2 * SHARDS, fresh.requests  # each shard: its header and a tensor, then again
    finally:
        cdn.close()


def test_a_refused_signature_is_named_not_taken_for_a_missing_token(fresh):
    """A 403 from an address whose query is signed (the CDN a hub file is redirected to, whose
    signatures it takes no more) says the signature was refused; without a signature, a token is needed."""
    cdn = Server(fresh.root_path)
    try:
        fresh.redirect_to, cdn.signature_uses = cdn.url, 0
        refused = run("inspect", "hf://org/model/model-00001-of-00003.safetensors")
        _one_line_error(refused, "hf://org/model/model-00001-of-00003.safetensors: the signed URL it was redirected"
                        " to was refused (HTTP 403: expired or invalid signature); try again")
        assert "X-Amz" not in refused.stderr and "token" not in refused.stderr
    finally:
        cdn.close()
    fresh.redirect_to, fresh.signed = None, "s3cr3t"
    unsigned = run("inspect", f"{fresh.url}/files/model/model.safetensors.index.json")
    _one_line_error(unsigned, "model.safetensors.index.json: access denied (HTTP 403); a token is needed")


def test_worker_processes_read_a_remote_file_on_connections_of_their_own(fresh, s3):
    """--workers 2 forks processes that read a remote file's tensors side by side: each on its own
    connection (a connection kept by the process that forked them is not theirs to share)."""
    path = fresh.root_path / "files" / "many.safetensors"
    generator = torch.Generator().manual_seed(5)
    save_file({f"layers.{i}.weight": torch.randn(128, 128, generator=generator) for i in range(16)}, path)
    s3.client.upload_file(str(path), "runs", "many.safetensors")
    expected = run("inspect", "--json", "--workers", "1", path)
    for url in (f"{fresh.url}/files/many.safetensors", "s3://runs/many.safetensors"):
        got = run("inspect", "--json", "--workers", "2", url)
        assert got.exit_code == 0, got.stderr
        assert _without_source(json.loads(got.stdout)) == _without_source(json.loads(expected.stdout))


def test_a_token_in_huggingface_hubs_token_file_is_sent_to_the_hub(fresh, tmp_path):
    """No HF_TOKEN, but `hf auth login` left a token file: it is sent (and never printed)."""
    from helpers import run_process

    fresh.token = "file-token"
    (tmp_path / "token").write_text("file-token\n")
    got = run_process("inspect", "--no-stats", "hf://org/model", env={"HF_TOKEN_PATH": str(tmp_path / "token")})
    assert got.returncode == 0, got.stderr
    assert fresh.authorizations and all(a == "Bearer file-token" for a in fresh.authorizations)
    assert b"file-token" not in got.stdout + got.stderr
    fresh.reset()
    got = run_process("inspect", "--no-stats", "hf://org/model", env={"HF_TOKEN_PATH": str(tmp_path / "none")})
    assert got.returncode == 2 and b"HF_TOKEN" in got.stderr, got.stderr


def test_a_presigned_urls_signature_is_never_shown(fresh, tmp_path):
    """The query of a presigned address is a secret: errors, notes, results, a report page and the
    operations history an output records name the URL without it."""
    from safetensors import safe_open

    fresh.signed = "s3cr3t"
    query = "X-Amz-Credential=AKIA0SECRET/20261206/us-east-1/s3/aws4_request&X-Amz-Signature=f00d&sig=s3cr3t"
    folder = f"{fresh.url}/files/model"
    index = f"{folder}/model.safetensors.index.json"
    secrets = ("s3cr3t", "AKIA0SECRET", "f00d")
    denied = run("inspect", f"{index}?X-Amz-Signature=f00d")
    _one_line_error(denied, f"{index}?…: the signed URL was refused (HTTP 403: expired or invalid signature);"
                    " ask for a new one")
    missing = run("inspect", f"{folder}/nothing.safetensors?{query}")
    _one_line_error(missing, f"{folder}/nothing.safetensors?…: not found")
    shown = run("inspect", "--no-stats", f"{index}?{query}")
    assert shown.exit_code == 0 and shown.stdout.startswith(f"{index}?…: sharded safetensors"), shown.stdout
    assert json.loads(run("inspect", "--json", "--no-stats", f"{index}?{query}").stdout)["source"] == f"{index}?…"
    written = run("zero", f"{index}?{query}", "-p", "model.layers.0.weight", "-o", tmp_path / "out/")
    assert written.exit_code == 0 and f"carried from {folder}?… (a remote input)" in written.stderr, written.stderr
    save_file({"model.layers.0.weight": torch.zeros(*BIG)}, tmp_path / "zeros.safetensors")
    copied = run("copy", tmp_path / "zeros.safetensors", "--source", f"{index}?{query}", "-o", tmp_path / "c.safetensors")
    assert copied.exit_code == 0, copied.stderr
    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        history = json.loads(f.metadata()["paramsurgeon.operations"])
    assert history == [f"copy from {index}?…: model.layers.0.weight->model.layers.0.weight"]
    assert run("report", f"{index}?{query}", "-o", tmp_path / "page.html").exit_code == 0
    everything = [r.stdout + r.stderr for r in (denied, missing, shown, written, copied)] + [
        (tmp_path / "page.html").read_text(), (tmp_path / "out" / "model.safetensors.index.json").read_text()]
    assert not [s for s in secrets for text in everything if s in text]

"""report: the HTML page holds the findings, the charts and the relative changes computed again with
torch; it references nothing outside itself; and headless Chromium renders it (not blank) without one
network request. Without chromium the browser test skips, unless PARAMSURGEON_REQUIRE_CHROMIUM=1 (CI)."""

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, register_input, run

import paramsurgeon as ps
from paramsurgeon.analysis.drift import relative_changes

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
REQUIRED = os.environ.get("PARAMSURGEON_REQUIRE_CHROMIUM") == "1"
# With PARAMSURGEON_SCREENSHOT=samples/report.png the browser test keeps its screenshot there (the README's).
SCREENSHOT = os.environ.get("PARAMSURGEON_SCREENSHOT")


@pytest.fixture
def pair(tmp_path, request):
    """A base and a 'fine-tuned' copy: the head moved a lot, one conv a little, one layer zeroed, one spiked."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_health import looks_trained

    base = looks_trained(0)
    tuned = {name: value.clone() for name, value in base.items()}
    tuned["fc2.weight"] += torch.randn(10, 32) * 0.05
    tuned["conv1.weight"] += torch.randn(8, 3, 3, 3) * 0.001
    tuned["conv2.weight"].zero_()
    tuned["fc1.weight"][0, 0] = 40.0
    paths = tmp_path / "base.pt", tmp_path / "tuned.pt"
    torch.save(base, paths[0])
    torch.save(tuned, paths[1])
    return register_input(request, paths[0]), register_input(request, paths[1]), base, tuned


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.references = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.references += [value for name, value in attrs if name in ("src", "href", "xlink:href", "action", "data")
                            and value]


def external_references(page: str) -> list[str]:
    """Everything in the page a browser could fetch from elsewhere: attributes, CSS url()/@import, scripts."""
    parser = Tags()
    parser.feed(page)
    outside = [r for r in parser.references if not r.startswith("#")]
    outside += re.findall(r"url\(\s*['\"]?(?!#)([^)'\"]+)", page) + re.findall(r"@import", page)
    outside += [t for t in parser.tags if t in ("script", "link", "iframe", "img", "object", "embed")]
    return outside


def test_page_content(pair, tmp_path):
    base_path, tuned_path, base, tuned = pair
    out = tmp_path / "report.html"
    result = run("report", tuned_path, "--against", base_path, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and f"wrote {out}" in result.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3  # depth, change, histograms
    assert external_references(page) == []
    for rule, name, severity in (("dead", "conv2.weight", "fail"), ("spike", "fc1.weight", "warning")):  # ~300x
        assert re.search(rf"<td class={severity}>{rule}</td>.*?<td>{re.escape(name)}</td>", page)
    moved = {name: float((tuned[name].double() - base[name].double()).norm() / base[name].double().norm())
             for name in ("fc2.weight", "conv1.weight")}
    from paramsurgeon.report.render import short_number

    for name, value in moved.items():  # the 'most moved' table, largest first
        assert f"<tr><td>{name}</td><td class=n>{short_number(value)}</td></tr>" in page
    assert page.index("<td>conv2.weight</td><td class=n>1.00</td>") < page.index("<td>fc2.weight</td><td class=n>")


def test_relative_changes_against_torch(pair):
    base_path, tuned_path, base, tuned = pair
    changes = relative_changes(ps.load(str(tuned_path)), ps.load(str(base_path)), list(tuned))
    for name, value in changes.items():
        if not tuned[name].is_floating_point():
            assert value is None
            continue
        a, b = tuned[name].double(), base[name].double()
        expected = float((a - b).norm() / b.norm()) if b.norm() else 0.0  # no tensor moved from zeros here
        assert value == (pytest.approx(expected, rel=1e-12, abs=0), False), name


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_relative_changes_of_float8_tensors(tmp_path, dtype):
    """float8 weights (FP8 checkpoints stored plainly) take part in no type promotion: their change
    is computed in float64 like the others' and the page is written (it was an internal error)."""
    torch.manual_seed(0)
    tuned, base = ({"w8": torch.randn(64, 16).to(dtype), "w": torch.randn(8)} for _ in range(2))
    torch.save(tuned, tmp_path / "tuned.pt")
    torch.save(base, tmp_path / "base.pt")
    changes = relative_changes(ps.load(str(tmp_path / "tuned.pt")), ps.load(str(tmp_path / "base.pt")), list(tuned))
    for name in tuned:
        a, b = tuned[name].double(), base[name].double()
        assert changes[name] == (pytest.approx(float((a - b).norm() / b.norm()), rel=1e-12), False), name
    result = run("report", tmp_path / "tuned.pt", "--against", tmp_path / "base.pt", "-o", tmp_path / "r.html")
    assert result.exit_code == 0 and "w8" in (tmp_path / "r.html").read_text()


def test_standard_output_and_errors(tmp_path):
    result = run("report", "samples/resnet.pt", "-o", "-")
    assert result.exit_code == 0 and result.stdout.startswith("<!DOCTYPE html>")
    missing = run("report", "samples/resnet.pt")
    assert missing.exit_code == 2 and "-o" in missing.stderr
    absent = run("report", "samples/resnet.pt", "--against", "samples/nothing.pt", "-o", tmp_path / "r.html")
    assert absent.exit_code == 2 and not (tmp_path / "r.html").exists()


def test_names_in_any_script_are_drawn_without_warnings(tmp_path):
    """A tensor named in CJK: the page shows the name (as SVG text, drawn by the browser's fonts) and
    stderr holds the one line saying what was written, no matplotlib warning about its own font."""
    name = "编码器.层.权重"
    torch.save({name: torch.randn(4, 4), "plain.weight": torch.randn(4)}, tmp_path / "cjk.pt")
    result = subprocess.run([sys.executable, "-m", "paramsurgeon", "report", tmp_path / "cjk.pt", "-o",
                             tmp_path / "cjk.html"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr.startswith("wrote ") and result.stderr.count("\n") == 1, \
        result.stderr
    assert name in (tmp_path / "cjk.html").read_text(encoding="utf-8")


def test_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import raises ImportError
    result = run("report", "samples/resnet.pt", "-o", tmp_path / "r.html")
    assert result.exit_code == 2
    assert "pip install 'paramsurgeon[report]'" in result.stderr
    assert not (tmp_path / "r.html").exists()


def chromium(page, folder, png):
    """Render ``page`` headless to ``png``, with every host name unresolvable; the URLs the page requested,
    from the net log (the browser's own calls home, made for no page, are not the page's)."""
    log = folder / f"{png.stem}-net.json"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                    f"--user-data-dir={folder / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
                    f"--log-net-log={log}", "--window-size=1280,2200", f"--screenshot={png}", page.as_uri()],
                   capture_output=True, timeout=180, check=True)
    text = log.read_text(errors="replace").rstrip().rstrip(",")
    events = json.loads(text if text.endswith("}") else text + "]}")["events"]  # killed browsers leave it open
    return [e["params"]["url"] for e in events
            if "file://" in e.get("params", {}).get("network_isolation_key", "")
            and re.match(r"(https?|wss?|ftp)://", e["params"].get("url", ""))]


def test_chromium_renders_the_report_offline(pair, tmp_path, monkeypatch):
    if CHROMIUM is None:
        message = "chromium is not installed (apt-get install chromium)"
        pytest.fail(message + " and PARAMSURGEON_REQUIRE_CHROMIUM=1") if REQUIRED else pytest.skip(message)
    from PIL import Image, ImageStat

    base_path, tuned_path, _, _ = pair
    page = tmp_path / "report.html"
    monkeypatch.chdir(tmp_path)  # short names in the page (and the README's screenshot)
    assert run("report", tuned_path.name, "--against", base_path.name, "-o", page).exit_code == 0
    png = tmp_path / "report.png"
    requested = chromium(page, tmp_path, png)
    assert requested == []
    image = Image.open(png).convert("L")
    assert image.size == (1280, 2200)
    assert ImageStat.Stat(image).stddev[0] > 20  # not blank: text and charts on white
    dark = sum(image.histogram()[:128]) / (image.size[0] * image.size[1])
    assert 0.005 < dark < 0.5
    # The net log does record requests: a page with an outside image shows it.
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><img src="http://example.invalid/pixel.png">')
    assert "http://example.invalid/pixel.png" in chromium(control, tmp_path, tmp_path / "control.png")
    if SCREENSHOT:
        shutil.copyfile(png, os.path.join(ROOT, SCREENSHOT))


@pytest.fixture
def gpt2_pair(tmp_path, request):
    """A fresh 12-layer GPT-2 (its biases all zeros, as transformers initialises them) and a 'fine-tuned'
    copy where every tensor moved, both as safetensors (whose names are in alphabetical order)."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=12, n_head=2, bos_token_id=0, eos_token_id=0)
    base = {k: v.clone() for k, v in GPT2LMHeadModel(config).state_dict().items() if k != "lm_head.weight"}
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    paths = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(base, paths[0])
    save_file(tuned, paths[1])
    return register_input(request, paths[0]), register_input(request, paths[1]), base, tuned


def svg_labels(svg: str, axis: str) -> dict[float, str]:
    """The tick labels matplotlib drew on ``axis`` ('x' or 'y') of one plot, by the position of their tick."""
    found = {}
    for tick in re.split(rf'<g id="{axis}tick_\d+">', svg)[1:]:  # each tick up to the next one
        position = float(re.search(rf'<use [^>]*{axis}="([-\d.]+)"', tick).group(1))
        found[round(position, 2)] = html.unescape(re.search(r"<text[^>]*>(.*?)</text>", tick, re.S).group(1))
    return found


def bars(svg: str) -> list[float]:
    """The y of each bar of the change chart (a horizontal line each)."""
    group = re.search(r'<g id="change-bars">(.*?)</g>', svg, re.S).group(1)
    return [round(float(y), 2) for y in re.findall(r'<path d="M [-\d.]+ ([-\d.]+)', group)]


def test_depth_follows_the_network_order_numbers_compare_as_numbers(gpt2_pair, tmp_path):
    base_path, tuned_path, base, tuned = gpt2_pair
    out = tmp_path / "report.html"
    assert run("report", tuned_path, "--against", base_path, "-o", out).exit_code == 0
    depth, change, _ = out.read_text().split("<svg")[1:]
    across = layer_numbers(svg_labels(depth.split('<g id="axes_')[-1], "x"))  # the depth chart's (thinned), in
    # its lowest plot, left to right
    down = layer_numbers(svg_labels(change, "y"))  # every bar's label, top to bottom (SVG's y grows downwards)
    assert down == sorted(down) and set(down) == set(range(12)), down  # alphabetical: 0, 1, 10, 11, 2, ...
    assert across == sorted(across) and len(set(across)) >= 6, across


def layer_numbers(labels: dict[float, str]) -> list[int]:
    """The block number of each label naming one of GPT-2's blocks, in the order of their positions."""
    found = (re.search(r"\.h\.(\d+)\.", labels[p]) for p in sorted(labels))
    return [int(m.group(1)) for m in found if m]


def test_a_tensor_zero_in_the_base_gets_a_finite_change_marked_was_zero(gpt2_pair, tmp_path):
    base_path, tuned_path, base, tuned = gpt2_pair
    out = tmp_path / "report.html"
    assert run("report", tuned_path, "--against", base_path, "-o", out).exit_code == 0
    page = out.read_text()
    from paramsurgeon.report.render import short_number

    # ground truth with torch: the change per value against the base's root mean square over every tensor
    scale = (sum(float(b.double().square().sum()) for b in base.values()) / sum(b.numel() for b in base.values())) ** .5
    zeros = [name for name, b in base.items() if not b.any()]
    assert "transformer.h.11.attn.c_attn.bias" in zeros
    for name in zeros:
        value = float((tuned[name].double() - base[name].double()).square().mean().sqrt()) / scale
        assert re.search(rf"<td>{re.escape(name)}</td>.*?<td class=n>{re.escape(short_number(value))} \(was zero\)</td>"
                         r"</tr>", page), name
    assert ">inf<" not in page and "inf (was zero)" not in page
    changes = relative_changes(ps.load(str(tuned_path)), ps.load(str(base_path)), list(tuned))
    assert {n for n, c in changes.items() if c.was_zero} == set(zeros)
    for name in set(base) - set(zeros):
        a, b = tuned[name].double(), base[name].double()
        assert changes[name] == (pytest.approx(float((a - b).norm() / b.norm()), rel=1e-12), False)


@pytest.mark.parametrize("most", [None, 50])
def test_every_drawn_bar_is_labelled(gpt2_pair, tmp_path, monkeypatch, most):
    from paramsurgeon.report import html as page

    base_path, tuned_path, base, tuned = gpt2_pair
    if most:
        monkeypatch.setattr(page, "MAX_BARS", most)  # a larger model: the chart shows some, evenly spaced
    out = tmp_path / "report.html"
    assert run("report", tuned_path, "--against", base_path, "-o", out).exit_code == 0
    change = out.read_text().split("<svg")[2]
    drawn, labels = bars(change), svg_labels(change, "y")
    assert len(drawn) == len(labels) == (most or len(base))  # every tensor moved: one bar and one label each
    assert all(y in labels and labels[y] for y in drawn)
    assert set(labels.values()) <= set(base) and (most or sorted(labels.values()) == sorted(base))
    down = layer_numbers(labels)
    assert down == sorted(down) and len(set(down)) == 12

"""Issue 25, attack class 7 (paths): a hostile coordinator names files in the run config.

`radiomics-params` and `pretrained` are paths the coordinator sends; a site used to open
whatever they named. At commit 862bbee, against a simulated default-policy site:
- `radiomics-params` = a YAML-ish file outside the site: the reply's reason echoed the
  file's line (`mapping values are not allowed here ... line 1, column 22: api_key:
  TOKEN-7f3a9c: rotate ^`) or a value (`invalid literal for int() with base 10:
  'TOKEN-b41e'`); a missing path answered `[Errno 2] No such file or directory`, an
  existing one a parse error (an existence oracle: every path told apart); `/dev/zero` was
  read until memory ran out (in a child under a 3 GiB address-space limit: `MemoryError`
  after ~10 s and 2.5 GB resident).
- `pretrained` = a `.pt` anywhere: the setup reply held its sha256 (1/1 hash recovered,
  equal to hashlib's), and a missing one answered "missing at this site (<absolute path>)"
  (existence oracle, and the site's own folder layout).

After: a query names a preset shipped with the app (`paper`) or a file inside the site
folder (for pretrained weights also the site's own `pretrained_dir`); nothing else is
opened. The tests assert on what the attacker learns: nothing of the file's content or hash
is in any string or value of the reply, the replies for an existing and a missing outside
path are identical, and `/dev/zero` is answered at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.handlers import serve
from client.local.extraction import params_file
from client.site.session import clear_sessions
from shared import schema
from simulation.cohort import simulate_cohort

ROOT = Path(__file__).resolve().parents[2]
TOKENS = ("TOKEN-7f3a9c", "TOKEN-b41e", "rotate")
CONTEXT = {"task": "her2-positive", "workers": 1}


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    simulate_cohort(tmp_path / "sites", n_sites=1, n_patients=38, seed=4, images=False)
    clear_sessions()
    return tmp_path / "sites" / "site-1"


def secrets(folder: Path) -> dict[str, Path]:
    """Files a hospital keeps outside its FedDLR site folder."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"syntax": folder / "secret.yaml", "value": folder / "label.yaml"}
    files["syntax"].write_text("api_key: TOKEN-7f3a9c: rotate\n")
    files["value"].write_text("setting:\n  label: TOKEN-b41e\n")
    return files


def learned(reply: dict[str, Any]) -> str:
    """Every string and value of a reply, as one text (what the coordinator reads)."""
    return json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                       for k, v in reply.items()}, default=repr)


def extract(site: Path, params: str) -> dict[str, Any]:
    return serve(site, schema.RADIOMICS_EXTRACT, {**CONTEXT, "radiomics-params": params}, "r")


def setup(site: Path, pretrained: str) -> dict[str, Any]:
    return serve(site, schema.TRAIN_SETUP, {"task": "her2-positive", "pretrained": pretrained},
                 "r")


def assert_nothing_of(reply: dict[str, Any], file: Path) -> None:
    text = learned(reply)
    assert not any(token in text for token in TOKENS), text
    for line in file.read_text().splitlines():
        assert line.strip() not in text, (line, text)
    assert hashlib.sha256(file.read_bytes()).hexdigest() not in text


def test_7a_radiomics_params_outside_the_site_echo_nothing_and_are_no_oracle(
        site: Path, tmp_path: Path) -> None:
    files = secrets(tmp_path / "hospital")
    (site / "linked.yaml").symlink_to(files["syntax"])  # a link out of the site folder
    replies = {name: extract(site, str(path)) for name, path in files.items()}
    replies["missing"] = extract(site, str(tmp_path / "hospital" / "nothing.yaml"))
    replies["passwd"] = extract(site, "/etc/passwd")
    replies["climb"] = extract(site, "../../hospital/secret.yaml")
    replies["link"] = extract(site, "linked.yaml")
    for name, reply in replies.items():
        assert reply["status"] == schema.STATUS_REFUSED, (name, reply)  # and audited
        for file in files.values():
            assert_nothing_of(reply, file)
    # existing, missing, climbing and linked outside paths: one and the same answer
    assert len({learned(r) for r in replies.values()}) == 1, replies


def test_7a_a_yaml_inside_the_site_that_is_not_pyradiomics_echoes_nothing(
        site: Path) -> None:
    (site / "notes.yaml").write_text("api_key: TOKEN-7f3a9c: rotate\n")
    (site / "label.yaml").write_text("setting:\n  label: TOKEN-b41e\n")
    for name in ("notes.yaml", "label.yaml", "site.yaml"):
        reply = extract(site, name)
        assert reply["status"] != schema.STATUS_OK, reply
        assert_nothing_of(reply, site / name)
    reply = extract(site, "clinical.csv")  # not a YAML: never opened
    assert reply["status"] != schema.STATUS_OK and "patient" not in learned(reply)


def test_7a_dev_zero_and_large_files_are_answered_at_once(site: Path) -> None:
    """/dev/zero is never read; a file inside the site is read up to a bound. Run in a
    child process under an address-space limit, so an unbounded read cannot take the
    machine down."""
    (site / "zero.yaml").symlink_to("/dev/zero")
    (site / "huge.yaml").write_bytes(b"# " + b"x" * (8 << 20) + b"\n")
    script = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from client.handlers import serve\n"
        "from shared import schema\n"
        "out = {}\n"
        "for name in ('/dev/zero', 'zero.yaml', 'huge.yaml'):\n"
        "    r = serve(sys.argv[1], schema.RADIOMICS_EXTRACT, {'task': 'her2-positive',"
        " 'workers': 1, 'radiomics-params': name}, 'r')\n"
        "    out[name] = [r['status'], r.get('reason', '')]\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, str(site)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(status != schema.STATUS_OK for status, _ in out.values()), out
    assert "MemoryError" not in json.dumps(out), out
    assert out["/dev/zero"] == out["zero.yaml"], out  # both outside the site folder


def test_7a_presets_and_site_files_still_work(site: Path) -> None:
    paper = extract(site, "")
    assert paper["status"] == schema.STATUS_OK, paper
    assert extract(site, "paper") == paper
    own = site / "params" / "mine.yaml"
    own.parent.mkdir()
    own.write_bytes((ROOT / "shared" / "radiomics_params.yaml").read_bytes())
    assert extract(site, "params/mine.yaml")["status"] == schema.STATUS_OK
    assert extract(site, str(own))["status"] == schema.STATUS_OK  # absolute, inside
    missing = extract(site, "params/other.yaml")
    assert missing["status"] != schema.STATUS_OK and "params/other.yaml" in missing["reason"]
    assert str(site) not in learned(missing)  # the site's own layout stays at the site


def weights(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.from_numpy(np.random.default_rng(seed).normal(size=8))}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_7b_pretrained_outside_the_site_gives_no_hash_and_no_oracle(
        site: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "model.pt"
    digest = weights(outside, 1)
    (site / "linked.pt").symlink_to(outside)
    replies = {"file": setup(site, str(outside)),
               "missing": setup(site, str(tmp_path / "elsewhere" / "none.pt")),
               "climb": setup(site, "../../elsewhere/model.pt"),
               "link": setup(site, "linked.pt")}
    for name, reply in replies.items():
        text = learned(reply)
        assert digest not in text and str(tmp_path) not in text, (name, text)
        assert reply.get("pretrained.sha256", "") == "", (name, reply)
    assert len({reply["pretrained.error"] for reply in replies.values()}) == 1, replies


def test_7b_pretrained_inside_the_site_or_its_configured_folder(
        site: Path, tmp_path: Path) -> None:
    inside = weights(site / "weights" / "model.pt", 2)
    assert setup(site, "weights/model.pt")["pretrained.sha256"] == inside
    assert setup(site, str(site / "weights" / "model.pt"))["pretrained.sha256"] == inside
    missing = setup(site, "weights/none.pt")
    assert "missing" in missing["pretrained.error"] and str(site) not in learned(missing)

    shared_dir = tmp_path / "consortium"
    there = weights(shared_dir / "resnet.pth", 3)
    assert setup(site, str(shared_dir / "resnet.pth"))["pretrained.sha256"] == ""
    config = yaml.safe_load((site / "site.yaml").read_text())
    (site / "site.yaml").write_text(yaml.safe_dump({**config,
                                                    "pretrained_dir": str(shared_dir)}))
    clear_sessions()
    assert setup(site, "resnet.pth")["pretrained.sha256"] == there
    assert setup(site, str(shared_dir / "resnet.pth"))["pretrained.sha256"] == there
    assert setup(site, "weights/model.pt")["pretrained.sha256"] == inside  # still the site's
    other = weights(tmp_path / "other" / "o.pt", 4)  # beside the configured folder
    assert other not in learned(setup(site, str(tmp_path / "other" / "o.pt")))
    assert other not in learned(setup(site, "../other/o.pt"))


PARTS = st.sampled_from(["..", ".", "", "sub", "out", "hospital", "secret.yaml", "mine.yaml",
                         "etc", "passwd", "site-1", "sites", "zero.yaml"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/sites/site-1 (mine.yaml, sub/mine.yaml, out -> ../../hospital, zero.yaml ->
    /dev/zero) beside base/hospital/secret.yaml."""
    base = tmp_path_factory.mktemp("tree")
    site = base / "sites" / "site-1"
    (site / "sub").mkdir(parents=True)
    (base / "hospital").mkdir()
    for file in (site / "mine.yaml", site / "sub" / "mine.yaml"):
        file.write_bytes((ROOT / "shared" / "radiomics_params.yaml").read_bytes())
    (site / "out").symlink_to(base / "hospital")
    (site / "zero.yaml").symlink_to("/dev/zero")
    return base


def answer(name: str, site: Path) -> str:
    try:
        found = params_file(name, site)
    except ValueError as error:
        return f"{type(error).__name__}: {error}"
    assert found.resolve().is_relative_to(site.resolve()) or found == params_file("", site)
    return f"file {found}"


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(absolute=st.booleans(), parts=st.lists(PARTS, max_size=6))
def test_7a_any_name_opens_only_inside_and_no_answer_depends_on_an_outside_file(
        tree: Path, absolute: bool, parts: list[str]) -> None:
    """Hypothesis over names: a name resolves only to a file inside the site folder (or a
    preset), and no answer changes when a file outside the site appears or disappears."""
    site = tree / "sites" / "site-1"
    name = "/".join(parts)
    if absolute:
        name = f"{tree}/{name}"
    secret = tree / "hospital" / "secret.yaml"
    secret.write_text("api_key: TOKEN-7f3a9c: rotate\n")
    with_secret = answer(name, site)
    secret.unlink()
    assert answer(name, site) == with_secret
    assert not any(token in with_secret for token in TOKENS)

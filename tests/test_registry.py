"""Registry: names, atomic locked writes (real concurrent processes), hash checks, recipes, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support.artefacts import tiny_selection, tiny_subnetwork
from support.cli import main_in_process, module_cli
from support.towers import make_tiny_resnet

from opentrans_hub import OpenTransError, Subnetwork
from opentrans_hub.towers.backbones import BUILDERS
from opentrans_hub.zoo.registry import Registry, builtin_index_dir, check_name, file_sha256, load_index

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "reg", index_dir=tmp_path / "no-index")


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["rn50-openai-imp21", "a", "0.1_x-y", "x" * 128])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Upper", "../escape", "a/b", ".hidden", "-dash", "_u", "a b", "x" * 129,
                                  "name\n", "é", "a\\b"])
def test_bad_names_refused(name, registry, tmp_path):
    with pytest.raises(OpenTransError, match="bad registry name"):
        check_name(name)
    path = tiny_subnetwork().save(tmp_path / "s.safetensors")
    with pytest.raises(OpenTransError, match="bad registry name"):
        registry.add(path, name)
    assert not (registry.root / "entries").exists() or not any((registry.root / "entries").iterdir())


# ------------------------------------------------------------------------------------------------ entries
def test_add_list_info_get_roundtrip(registry, tmp_path):
    sub = tiny_subnetwork()
    path = sub.save(tmp_path / "s.safetensors", encoding="zstd")
    entry = registry.add(path, "tiny-sub")
    assert entry.sha256 == sub.sha256 and entry.kind == "subnetwork"
    assert entry.path.parent == registry.objects_dir and entry.path.read_bytes() != b""
    sel = tiny_selection()
    registry.add(sel, "tiny-sel")
    assert registry.names() == ["tiny-sel", "tiny-sub"]
    rows = {row["name"]: row for row in registry.list()}
    assert rows["tiny-sub"]["sparsity"] == pytest.approx(sub.sparsity)
    assert rows["tiny-sel"]["trainable"] == len(sel.trainable)
    got = registry.get_subnetwork("tiny-sub")
    assert got.sha256 == sub.sha256 and all(torch.equal(got[n], sub[n]) for n in sub)
    assert registry.get_selection("tiny-sel").trainable == sel.trainable
    info = registry.info("tiny-sub")
    assert info["verified"] and info["stats"]["sparsity"] == pytest.approx(sub.sparsity)
    with pytest.raises(OpenTransError, match="layer selection, not a subnetwork"):
        registry.get_subnetwork("tiny-sel")
    with pytest.raises(OpenTransError, match="no registry entry"):
        registry.info("missing")


def test_name_taken_idempotent_overwrite_remove(registry):
    a, b = tiny_subnetwork(0), tiny_subnetwork(1)
    first = registry.add(a, "x")
    assert registry.add(a, "x").file_sha256 == first.file_sha256  # same content: no-op
    with pytest.raises(OpenTransError, match="is taken"):
        registry.add(b, "x")
    assert registry.get_subnetwork("x").sha256 == a.sha256
    registry.add(b, "x", overwrite=True)
    assert registry.get_subnetwork("x").sha256 == b.sha256
    registry.add(b, "y")
    registry.remove("x")
    assert registry.names() == ["y"] and registry.get_subnetwork("y").sha256 == b.sha256
    registry.remove("y")
    assert list(registry.objects_dir.iterdir()) == []


def test_tampered_object_refused(registry, capsys):
    entry = registry.add(tiny_subnetwork(), "t")
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0x01  # flip one mask bit: still a well-formed file with a valid-looking header
    entry.path.write_bytes(bytes(data))
    with pytest.raises(OpenTransError, match="tampered"):
        registry.get_subnetwork("t")
    code, _, err = main_in_process(capsys, "verify", "t", "--registry", str(registry.root))
    assert code == 2 and "tampered" in err and len(err.strip().splitlines()) == 1


def test_entry_escaping_the_registry_refused(registry, tmp_path):
    entry = registry.add(tiny_subnetwork(), "t")
    entry_file = registry.root / "entries" / "t.json"
    record = json.loads(entry_file.read_text())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(entry.path.read_bytes())
    for bad in ["../outside.safetensors", str(outside), "objects/../../outside.safetensors"]:
        entry_file.write_text(json.dumps({**record, "file": bad}))
        with pytest.raises(OpenTransError, match="only point into objects"):
            registry.get_subnetwork("t")
    # a well-formed object name that is a symlink out of the registry
    link = registry.objects_dir / ("0" * 64 + ".safetensors")
    link.symlink_to(outside)
    entry_file.write_text(json.dumps({**record, "file": f"objects/{link.name}"}))
    with pytest.raises(OpenTransError, match="escapes the registry"):
        registry.get_subnetwork("t")


def test_resolve_paths_and_unknowns(registry, tmp_path):
    sub = tiny_subnetwork()
    path = sub.save(tmp_path / "plain.safetensors")
    obj, source = registry.resolve(str(path))
    assert obj.sha256 == sub.sha256 and source.startswith("file:")
    sel_path = tiny_selection().save(tmp_path / "sel.json")
    assert registry.get_selection(sel_path).sha256 == tiny_selection().sha256
    with pytest.raises(OpenTransError, match="no registry entry, built-in recipe or file"):
        registry.resolve("nothing-here")
    with pytest.raises(OpenTransError, match="no such file"):
        registry.resolve(str(tmp_path / "missing.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(OpenTransError, match="broken.safetensors"):
        registry.resolve(str(broken))


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "home"))
    from opentrans_hub.zoo.registry import default_registry, load_subnetwork

    Registry().add(tiny_subnetwork(), "env-sub")
    assert default_registry().root == tmp_path / "home"
    assert load_subnetwork("env-sub").sha256 == tiny_subnetwork().sha256


# ------------------------------------------------------------------------------------------ concurrency
_WRITER = textwrap.dedent("""
    import sys
    from opentrans_hub import OpenTransError
    from opentrans_hub.zoo.registry import Registry
    root, ready, worker, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    reg = Registry(root, index_dir=root + "/no-index")
    open(f"{ready}.{worker}", "w").close()
    import glob, time
    while len(glob.glob(ready + ".*")) < 3:   # start together, after the slow imports
        time.sleep(0.01)
    try:
        reg.add(files[worker], "race")                  # no overwrite: exactly one process may win
        print("won")
    except OpenTransError as exc:
        print("lost" if "is taken" in str(exc) else f"error {exc}")
    for i in range(15):
        f = files[(worker + i) % len(files)]
        reg.add(f, "shared", overwrite=True)           # everyone fights over one name
        reg.add(f, f"w{worker}-{i % 3}", overwrite=True)
        reg.get_subnetwork("shared")                    # a reader must never see half an entry
""")


@pytest.mark.slow
def test_concurrent_processes_never_corrupt(tmp_path):
    files = [str(tiny_subnetwork(seed, sparsity=0.3 + 0.1 * seed).save(tmp_path / f"s{seed}.safetensors"))
             for seed in range(3)]
    root = tmp_path / "reg"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(tmp_path / "ready"), str(w), *files],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    results = [out.strip() for out, _ in outs]
    assert sorted(results) == ["lost", "lost", "won"], results
    registry = Registry(root, index_dir=tmp_path / "no-index")
    winner = files[results.index("won")]
    assert registry.get_subnetwork("race").sha256 == Subnetwork.load(winner).sha256
    allowed = {Subnetwork.load(f).sha256 for f in files}
    assert set(registry.names()) == {"race", "shared"} | {f"w{w}-{k}" for w in range(3) for k in range(3)}
    for name in registry.names():
        assert registry.get_subnetwork(name).sha256 in allowed
    assert not [p for p in root.rglob("*.tmp")], "temp files left behind"
    # no orphans: every object is referenced by an entry, every entry's object exists
    assert set(registry.objects_dir.iterdir()) == {registry.entry(name).path for name in registry.names()}


# ------------------------------------------------------------------------------------------------ recipes
def _tiny_builder(name, pretrained):
    return make_tiny_resnet(seed=99)  # weights are always loaded from the recipe's file afterwards


def _write_index(folder: Path, weights_sha: str, rounds: int = 5) -> Path:
    (folder / "recipes").mkdir(parents=True)
    recipe = {"format": "opentrans-hub/recipe", "format_version": 1, "name": "tiny-imp", "kind": "subnetwork",
              "arch": "tinytest/resnet", "base_weights": {"pretrained": "test", "file": "tiny.safetensors",
                                                          "sha256": weights_sha},
              "method": "global-magnitude-compounding",
              "settings": {"rounds": rounds, "rate": 0.1, "scope": {"layer_types": ["conv"], "exclude_first": True}}}
    (folder / "recipes" / "tiny-imp.json").write_text(json.dumps(recipe))
    index = {"format": "opentrans-hub/index", "format_version": 1,
             "entries": [{"name": "tiny-imp", "recipe": "recipes/tiny-imp.json"}]}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(BUILDERS, "tinytest", _tiny_builder)
    monkeypatch.setenv("OPENTRANS_HUB_WEIGHTS_DIR", str(tmp_path / "empty-cache"))
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file(make_tiny_resnet(seed=3).state_dict(), str(weights))
    return _write_index(tmp_path / "index", file_sha256(weights)), weights


def test_recipe_materialises_deterministically(tiny_recipe, tmp_path):
    index, weights = tiny_recipe
    reg_a = Registry(tmp_path / "a", index_dir=index)
    assert [r["status"] for r in reg_a.list()] == ["recipe (materialised on first use)"]
    sub = reg_a.get_subnetwork("tiny-imp", weights=weights)  # first use materialises into the user registry
    assert reg_a.names() == ["tiny-imp"] and reg_a.entry("tiny-imp").source == "builtin-recipe:tiny-imp"
    assert reg_a.get_subnetwork("tiny-imp").sha256 == sub.sha256  # now served from the registry, no weights
    again = Registry(tmp_path / "b", index_dir=index).materialise("tiny-imp", weights=weights)
    assert again.sha256 == sub.sha256
    # the first conv is excluded; 5 compounding rounds at 10 % of the live weights
    assert "conv1.weight" not in sub and "layer1.0.conv1.weight" in sub
    kept = sub.numel
    for _ in range(5):
        kept = round(kept * 0.9)
    assert sub.kept == kept
    tower = make_tiny_resnet(seed=3)
    params = dict(tower.named_parameters())
    kept_min = min(params[n].detach().abs()[sub[n]].min() for n in sub if sub[n].any())
    pruned_max = max(params[n].detach().abs()[~sub[n]].max() for n in sub if (~sub[n]).any())
    assert pruned_max <= kept_min  # global magnitude: nothing pruned is larger than anything kept
    assert sub.provenance["base_weights"]["sha256"] == file_sha256(weights)
    assert sub.provenance["settings"]["rounds"] == 5


def test_recipe_checks_base_weight_sha256(tiny_recipe, tmp_path):
    index, _ = tiny_recipe
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file(make_tiny_resnet(seed=4).state_dict(), str(other))
    registry = Registry(tmp_path / "reg", index_dir=index)
    with pytest.raises(OpenTransError, match="is not the .* recipe 'tiny-imp' was defined on"):
        registry.get_subnetwork("tiny-imp", weights=other)
    with pytest.raises(OpenTransError, match="needs its base weights"):
        registry.get_subnetwork("tiny-imp")
    assert registry.names() == []


def test_shipped_index_is_recipes_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENTRANS_HUB_WEIGHTS_DIR", str(tmp_path / "empty"))
    recipes = load_index(builtin_index_dir())
    assert "rn50-openai-imp21" in recipes
    rn50 = recipes["rn50-openai-imp21"]
    assert rn50["arch"] == "open_clip/RN50" and rn50["settings"]["rounds"] == 21
    assert rn50["settings"]["scope"]["exclude_first"] is True
    # the pinned digest is the one open_clip's own config carries for these weights
    from open_clip.pretrained import get_pretrained_cfg

    assert rn50["base_weights"]["sha256"] in get_pretrained_cfg("RN50", "openai")["url"]
    shipped = {p.suffix for p in builtin_index_dir().rglob("*") if p.is_file()}
    assert shipped == {".json"}, "masks/ must ship recipes, not artefacts made from other weights"
    registry = Registry(tmp_path / "reg")
    with pytest.raises(OpenTransError, match="needs its base weights.*not available here"):
        registry.get_subnetwork("rn50-openai-imp21")
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "reg"))
    code, out, _ = main_in_process(capsys, "info", "rn50-openai-imp21", "--json")
    assert code == 0 and json.loads(out)["method"] == "global-magnitude-compounding"
    code, _, err = main_in_process(capsys, "materialise", "rn50-openai-imp21")
    assert code == 2 and "--weights PATH" in err


def test_index_recipe_escaping_folder_refused(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text(json.dumps(
        {"format": "opentrans-hub/index", "entries": [{"name": "x", "recipe": "../evil.json"}]}))
    with pytest.raises(OpenTransError, match="escapes the index folder"):
        load_index(tmp_path / "idx")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_add_list_info_verify(tmp_path, monkeypatch, capsys):
    sub = tiny_subnetwork()
    path = sub.save(tmp_path / "s.safetensors")
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "home"))
    code, out, err = main_in_process(capsys, "add", str(path), "--name", "cli-sub", "--json")
    assert code == 0, err
    assert json.loads(out)["sha256"] == sub.sha256
    listed = json.loads(main_in_process(capsys, "list", "--json")[1])
    names = [row["name"] for row in listed["entries"]]
    assert names[0] == "cli-sub" and "rn50-openai-imp21" in names  # user entries first, then built-ins
    info = json.loads(main_in_process(capsys, "info", "cli-sub", "--json")[1])
    assert info["stats"]["sparsity"] == pytest.approx(sub.sparsity)
    code, out, _ = main_in_process(capsys, "verify", str(path))
    assert code == 0 and sub.sha256 in out
    code, out, _ = main_in_process(capsys, "list")
    assert code == 0 and "cli-sub" in out and "recipe" in out


def test_cli_process_error_is_one_line(tmp_path):
    path = tiny_subnetwork().save(tmp_path / "s.safetensors")
    bad = module_cli("add", str(path), "--name", "../x", env={"OPENTRANS_HUB_HOME": str(tmp_path / "home")})
    assert bad.returncode == 2 and "bad registry name" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_wheel_ships_the_recipe_index(tmp_path):
    """A wheel (not only the editable checkout) carries masks/ as opentrans_hub/masks and finds it."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "opentrans_hub", src / "opentrans_hub", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "masks", src / "masks", ignore=ignore)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "opentrans_hub/masks/index.json" in names
    assert "opentrans_hub/masks/recipes/rn50-openai-imp21.json" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run([sys.executable, "-c", "import opentrans_hub.zoo.registry as r; print(r.__file__); "
                            "print(r.builtin_index_dir()); print(sorted(r.load_index(r.builtin_index_dir())))"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr
    module_file, index_dir, names_line = probe.stdout.strip().splitlines()[-3:]
    assert module_file.startswith(str(site)) and index_dir == str(site / "opentrans_hub" / "masks")
    assert "rn50-openai-imp21" in names_line


def test_broken_entry_listed_not_fatal(registry):
    registry.add(tiny_subnetwork(0), "good")
    registry.add(tiny_subnetwork(1), "bad")
    (registry.root / "entries" / "bad.json").write_text("{not json")
    rows = {row["name"]: row for row in registry.list()}
    assert rows["good"]["status"] == "local" and rows["bad"]["status"].startswith("broken")
    with pytest.raises(OpenTransError, match="bad.json"):
        registry.get_subnetwork("bad")
    registry.add(tiny_subnetwork(2), "third")  # writes still work beside a broken entry
    assert registry.get_subnetwork("third").sha256 == tiny_subnetwork(2).sha256
    with pytest.raises(OpenTransError, match="bad.json"):
        registry.add(tiny_subnetwork(3), "bad")
    registry.add(tiny_subnetwork(3), "bad", overwrite=True)  # a broken entry can be replaced
    assert registry.get_subnetwork("bad").sha256 == tiny_subnetwork(3).sha256


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_recipe_reads_torchscript_base_weights(tmp_path, monkeypatch):
    """OpenAI's release files are TorchScript archives: after the sha256 pin they load through torch.jit."""
    monkeypatch.setitem(BUILDERS, "tinytest", _tiny_builder)
    tower = make_tiny_resnet(seed=5).eval()
    archive = tmp_path / "tiny-jit.pt"
    torch.jit.trace(tower, torch.randn(1, 3, 64, 64)).save(str(archive))
    index = _write_index(tmp_path / "index", file_sha256(archive), rounds=2)
    sub = Registry(tmp_path / "reg", index_dir=index).get_subnetwork("tiny-imp", weights=archive)
    from opentrans_hub.methods.imp import magnitude_masks

    params = {n: p.detach() for n, p in tower.named_parameters() if n in sub}
    masks = magnitude_masks(params, magnitude_masks(params, rate=0.1), rate=0.1)
    assert all(torch.equal(sub[n], masks[n]) for n in sub)

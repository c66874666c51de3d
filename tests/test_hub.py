"""Hub publish/pull against real loopback servers: olah (offline mode) for downloads, a small upload endpoint.

The stock ``huggingface_hub`` client talks to 127.0.0.1 only (a guard below refuses any other address).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from support.artefacts import finetuned_pruned, tiny_selection, tiny_subnetwork, train_and_check_exact
from support.cli import module_cli
from support.hubserver import LoopbackHub, OlahServer, refuse_non_loopback
from support.towers import make_tiny_resnet, use_tiny_family

from opentrans_hub import LayerSelection, OpenTransError, Subnetwork
from opentrans_hub.zoo.hub import MANIFEST, parse_hf_ref, pull, push
from opentrans_hub.zoo.registry import Registry

REPO = Path(__file__).resolve().parent.parent
HF_ENV = {"HF_HUB_DISABLE_XET": "1", "HF_HUB_ENABLE_HF_TRANSFER": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
          "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    server = LoopbackHub(tmp_path_factory.mktemp("loopback-hub")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    refuse_non_loopback(monkeypatch)


def rn50_like_subnetwork(seed: int) -> Subnetwork:
    gen = torch.Generator().manual_seed(seed)
    masks = {"layer1.0.conv1.weight": torch.rand(64, 64, 1, 1, generator=gen) > 0.7,
             "layer1.0.conv2.weight": torch.rand(64, 64, 3, 3, generator=gen) > 0.7}
    return Subnetwork(masks, arch="open_clip/RN50",
                      provenance={"method": "test-fixture", "base_weights": {"pretrained": "openai"}})


def hub_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return module_cli(*args, env={**HF_ENV, **env})


# -------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["subnetwork", "selection"])
def test_push_pull_identical(hub, tmp_path, kind):
    obj = rn50_like_subnetwork(0) if kind == "subnetwork" else tiny_selection()
    repo_id = f"org/roundtrip-{kind}"
    pushed = push(obj, repo_id, endpoint=hub.upload.url)
    got, record = pull(f"hf://{repo_id}", endpoint=hub.olah.url, cache_dir=tmp_path / "cache")
    assert type(got) is type(obj) and got.sha256 == obj.sha256 == pushed["sha256"]
    assert record["commit"] == pushed["commit"] and record["file_sha256"] == pushed["file_sha256"]
    if kind == "subnetwork":
        assert all(torch.equal(got[n], obj[n]) for n in obj)
    else:
        assert isinstance(got, LayerSelection) and got.trainable == obj.trainable
    # what olah served is what the upload endpoint committed into git
    files = subprocess.run(["git", "--git-dir", str(hub.repo(repo_id)), "ls-tree", "--name-only", "main"],
                           capture_output=True, text=True, check=True).stdout.split()
    plots = {"alpha.png"} if kind == "selection" else set()  # a selection's card shows its per-layer plot
    assert set(files) == {".gitattributes", "README.md", MANIFEST, record["path"].rsplit("/", 1)[1], *plots}


def test_model_card(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    sub = rn50_like_subnetwork(1)
    pushed = push(sub, "org/card", endpoint=hub.upload.url, license="mit")
    readme = Path(hf_hub_download("org/card", "README.md", revision=pushed["commit"], endpoint=hub.olah.url,
                                  cache_dir=tmp_path / "cache")).read_text()
    _, front, body = readme.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "opentrans-hub" and meta["license"] == "mit"
    assert {"pruning", "clip", "open-vocabulary-segmentation"} <= set(meta["tags"])
    assert meta["base_model"] == "timm/resnet50_clip.openai"
    assert f"{sub.sparsity:.2%}" in body and "layer1.0.conv2.weight" in body
    assert sub.sha256 in body and "test-fixture" in body and "opentrans-hub pull hf://" in body


def test_selection_card_shows_its_plot_and_lr_budget(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    from opentrans_hub.methods.select import select_layers

    # alphas 2.0, 2.1, ... over (0.5, 1.5): the first layer 0.5, the last 1.5
    sel = select_layers(tiny_selection().layers, "median", arch="test/tiny", lr_range=(0.5, 1.5))
    pushed = push(sel, "org/budget-card", endpoint=hub.upload.url)

    def get(name: str) -> Path:
        return Path(hf_hub_download("org/budget-card", name, revision=pushed["commit"], endpoint=hub.olah.url,
                                    cache_dir=tmp_path / "cache"))

    readme = get("README.md").read_text()
    assert "![per-layer plot](alpha.png)" in readme and "learning-rate budget" in readme
    assert f"lr budget: scales 0.500..1.500 over {len(sel.layers)} layers" in readme
    assert get("alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_revision_pinning(hub, tmp_path):
    a, b, c = (rn50_like_subnetwork(seed) for seed in (10, 11, 12))
    first = push(a, "org/pinned", endpoint=hub.upload.url)
    second = push(b, "org/pinned", endpoint=hub.upload.url)
    branch = push(c, "org/pinned", revision="exp", endpoint=hub.upload.url)
    assert len({first["commit"], second["commit"], branch["commit"]}) == 3

    def fetch(ref: str) -> str:
        return pull(ref, endpoint=hub.olah.url, cache_dir=tmp_path / "cache")[0].sha256

    assert fetch(f"hf://org/pinned@{first['commit']}") == a.sha256
    assert fetch("hf://org/pinned") == b.sha256
    assert fetch("hf://org/pinned@main") == b.sha256
    assert fetch("hf://org/pinned@exp") == c.sha256
    with pytest.raises(OpenTransError, match="org/pinned@nope"):
        fetch("hf://org/pinned@nope")


def test_pull_into_registry_and_push_by_name(hub, tmp_path):
    sub = tiny_subnetwork(5)
    source = Registry(tmp_path / "a")
    source.add(sub, "mine")
    pushed = push("mine", "org/byname", registry=source, endpoint=hub.upload.url)
    assert pushed["name"] == "mine"
    target = Registry(tmp_path / "b")
    _, record = pull("hf://org/byname", name="theirs", registry=target, endpoint=hub.olah.url,
                     cache_dir=tmp_path / "cache")
    entry = target.entry("theirs")
    assert entry.sha256 == sub.sha256 and entry.source == f"hf://org/byname@{record['commit']}"
    assert target.get_subnetwork("theirs").sha256 == sub.sha256


# ------------------------------------------------------------------------------------------ refusals
def test_tampered_file_refused(hub, tmp_path):
    sub = rn50_like_subnetwork(20)
    good = push(sub, "org/tampered", endpoint=hub.upload.url)
    repo = hub.repo("org/tampered")
    data = bytearray(subprocess.run(["git", "--git-dir", str(repo), "show", "main:subnetwork.safetensors"],
                                    capture_output=True, check=True).stdout)
    data[-1] ^= 0x01  # one mask bit, manifest untouched
    hub.upload._commit(repo, "main", {"subnetwork.safetensors": bytes(data)}, [], "tamper")
    with pytest.raises(OpenTransError, match="tampered"):
        pull("hf://org/tampered", endpoint=hub.olah.url, cache_dir=tmp_path / "cache")
    # the pinned good commit still pulls; then a tampered cache copy is refused too
    obj, record = pull(f"hf://org/tampered@{good['commit']}", endpoint=hub.olah.url, cache_dir=tmp_path / "cache")
    assert obj.sha256 == sub.sha256
    blob = Path(record["path"]).resolve()
    blob.write_bytes(bytes(data))
    with pytest.raises(OpenTransError, match="tampered"):
        pull(f"hf://org/tampered@{good['commit']}", endpoint=hub.olah.url, cache_dir=tmp_path / "cache")


def test_malicious_manifest_refused(hub, tmp_path):
    push(rn50_like_subnetwork(21), "org/evil", endpoint=hub.upload.url)
    repo = hub.repo("org/evil")
    manifest = json.loads(subprocess.run(["git", "--git-dir", str(repo), "show", f"main:{MANIFEST}"],
                                         capture_output=True, check=True).stdout)
    for bad in ("../../outside.safetensors", "hubconf.py"):
        hub.upload._commit(repo, "main", {MANIFEST: json.dumps({**manifest, "file": bad}).encode()}, [], "evil")
        with pytest.raises(OpenTransError, match="refusing"):
            pull("hf://org/evil", endpoint=hub.olah.url, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("ref", ["hf://onlyorg", "hf://a/b/c/d", "hf://a/b@bad rev", "hf://a/b@main/evil.py",
                                 "hf://../b", "https://huggingface.co/a/b"])
def test_bad_references(ref):
    with pytest.raises(OpenTransError):
        parse_hf_ref(ref)


# ------------------------------------------------------------------------------------------ CLI + offline
@pytest.mark.slow
def test_cli_push_pull_offline_cache_and_token(hub, tmp_path):
    sub = tiny_subnetwork(7)
    Registry(tmp_path / "home").add(sub, "mine")
    secret = "hf_loopbacktesttoken0123456789"
    pushed = hub_cli("push", "mine", "--repo-id", "org/cli", "--json",
                     env={"HF_ENDPOINT": hub.upload.url, "HF_TOKEN": secret, "HF_HOME": str(tmp_path / "hf-a"),
                          "OPENTRANS_HUB_HOME": str(tmp_path / "home")})
    assert pushed.returncode == 0, pushed.stderr
    assert secret not in pushed.stdout + pushed.stderr
    assert ("POST", "/api/models/org/cli/commit/main", f"Bearer {secret}") in hub.upload.requests
    commit = json.loads(pushed.stdout)["commit"]

    olah = OlahServer(tmp_path / "olah", mirrors=hub.olah.mirrors).start()  # a server this test may stop
    env = {"HF_ENDPOINT": olah.url, "HF_HOME": str(tmp_path / "hf-b"), "OPENTRANS_HUB_HOME": str(tmp_path / "home2")}
    try:
        pulled = hub_cli("pull", "hf://org/cli", "--name", "pulled", "--json", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["commit"] == commit
    finally:
        olah.stop()
    assert Registry(tmp_path / "home2").get_subnetwork("pulled").sha256 == sub.sha256
    offline_env = {**env, "HF_HUB_OFFLINE": "1"}  # the server is gone: everything comes from the HF cache
    cached = hub_cli("pull", "hf://org/cli", "--json", env=offline_env)
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["commit"] == commit
    verified = hub_cli("verify", "hf://org/cli", "--json", env=offline_env)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["sha256"] == sub.sha256
    missing = hub_cli("pull", "hf://org/roundtrip-subnetwork", env=offline_env)  # never pulled: one clear line
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "org/roundtrip-subnetwork" in missing.stderr


def test_backbone_weights_and_subnetwork_from_the_hub(hub, tmp_path, monkeypatch):
    """load_backbone with hf:// weights and an hf:// subnetwork; HF_ENDPOINT is honoured when set after import."""
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from opentrans_hub.methods.imp import magnitude_prune
    from opentrans_hub.transfer.backbone import load_backbone

    use_tiny_family(monkeypatch)
    tower = make_tiny_resnet(seed=4)
    weights = tmp_path / "tiny.safetensors"
    save_file(tower.state_dict(), str(weights))
    api = HfApi(endpoint=hub.upload.url)
    api.create_repo("org/tiny-weights", exist_ok=True)
    commit = api.upload_file(path_or_fileobj=str(weights), path_in_repo="tiny.safetensors",
                             repo_id="org/tiny-weights").oid
    sub = magnitude_prune(tower, sparsity=0.5, arch="tinytest/resnet", apply=False)
    push(sub, "org/tiny-sub", endpoint=hub.upload.url)

    monkeypatch.setenv("HF_ENDPOINT", hub.olah.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "home"))
    model = load_backbone("tinytest/resnet", pretrained=f"hf://org/tiny-weights@{commit}/tiny.safetensors",
                          subnetwork="hf://org/tiny-sub")
    params, reference = dict(model.named_parameters()), dict(tower.named_parameters())
    for name, keep in sub.masks.items():
        assert torch.equal(params[name].detach(), reference[name].detach() * keep)
    assert Registry().verify("hf://org/tiny-sub@main")["sha256"] == sub.sha256
    with pytest.raises(OpenTransError, match="bad Hub weights reference"):
        load_backbone("tinytest/resnet", pretrained="hf://org/tiny-weights/../../etc/passwd")


# ------------------------------------------------------------------------------------------ packed backbones
def test_packed_backbone_pack_push_pull_load_train(hub, tmp_path, monkeypatch):
    """A fine-tuned pruned checkpoint: pack -> push (model card) -> pull -> load_backbone -> training, masks exact."""
    from huggingface_hub import hf_hub_download

    from opentrans_hub.formats.packed import PackedFile
    from opentrans_hub.sparsity.masks import masked_parameters
    from opentrans_hub.transfer.backbone import load_backbone
    from opentrans_hub.zoo.packing import pack_checkpoint

    use_tiny_family(monkeypatch)
    tower, sub = finetuned_pruned(seed=7)
    state = tower.state_dict()
    torch.save({"model": {f"backbone.clip_model.visual.{k}": v for k, v in state.items()}, "iteration": 90},
               tmp_path / "model_final.pth")
    packed = tmp_path / "model_final.sparse.safetensors"
    info = pack_checkpoint(tmp_path / "model_final.pth", packed, subnetwork=sub)
    import huggingface_hub.constants

    monkeypatch.setattr(hub.upload, "lfs_threshold", 1 << 20)  # sent the Hub's LFS way (batch API, PUT, lfsFile)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the loopback speaks LFS, not Xet
    assert info["packed_bytes"] >= hub.upload.lfs_threshold
    pushed = push(str(packed), "org/finetuned-tiny", endpoint=hub.upload.url, base_model="timm/resnet50_clip.openai")
    assert pushed["kind"] == "packed" and pushed["sha256"] == info["content_sha256"]
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path, _ in hub.upload.requests)
    assert any(path == "/org/finetuned-tiny.git/info/lfs/objects/batch" for _, path, _ in hub.upload.requests)

    readme = Path(hf_hub_download("org/finetuned-tiny", "README.md", revision=pushed["commit"],
                                  endpoint=hub.olah.url, cache_dir=tmp_path / "cache")).read_text()
    _, front, body = readme.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "opentrans-hub" and meta["base_model"] == "timm/resnet50_clip.openai"
    assert meta["base_model_relation"] == "finetune"
    assert {"pruned", "sparse", "arxiv:2404.07448"} <= set(meta["tags"])
    assert f"{info['dense_bytes']:,} B" in body and f"{info['packed_bytes']:,} B" in body
    assert f"{sub.sparsity:.2%}" in body and "backbone.clip_model.visual.layer1.0.conv2.weight" in body
    assert 'pretrained="hf://org/finetuned-tiny"' in body and sub.sha256 in body

    monkeypatch.setenv("HF_ENDPOINT", hub.olah.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "home"))
    obj, record = pull("hf://org/finetuned-tiny", name="finetuned-tiny")
    assert isinstance(obj, PackedFile) and record["commit"] == pushed["commit"] and obj.subnetwork.sha256 == sub.sha256
    model = load_backbone("tinytest/resnet", pretrained="hf://org/finetuned-tiny")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert set(masked_parameters(model)) == set(sub.masks)
    train_and_check_exact(model, sub.masks)
    again = load_backbone("tinytest/resnet", pretrained="finetuned-tiny")  # the pulled registry name
    assert set(masked_parameters(again)) == set(sub.masks)
    push(sub, "org/mask-only", endpoint=hub.upload.url)
    with pytest.raises(OpenTransError, match="publishes a subnetwork, not weights"):
        load_backbone("tinytest/resnet", pretrained="hf://org/mask-only")


def test_subnetwork_card_is_an_adapter_and_packed_card_warns_without_base(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    from opentrans_hub.zoo.packing import pack_checkpoint

    sub = rn50_like_subnetwork(30)
    pushed = push(sub, "org/adapter-card", endpoint=hub.upload.url)
    readme = Path(hf_hub_download("org/adapter-card", "README.md", revision=pushed["commit"], endpoint=hub.olah.url,
                                  cache_dir=tmp_path / "cache")).read_text()
    meta = yaml.safe_load(readme.split("---\n", 2)[1])
    assert meta["base_model"] == "timm/resnet50_clip.openai" and meta["base_model_relation"] == "adapter"
    tower, tiny = finetuned_pruned(seed=8)
    torch.save(tower.state_dict(), tmp_path / "t.pth")
    pack_checkpoint(tmp_path / "t.pth", tmp_path / "t.sparse.safetensors", subnetwork=tiny)
    with pytest.warns(UserWarning, match="base model unknown"):
        push(str(tmp_path / "t.sparse.safetensors"), "org/no-base", endpoint=hub.upload.url)

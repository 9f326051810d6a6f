"""The ViT against timm and against docs/METHOD.md §2 written out by hand; checkpoint layouts of its §9."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model

timm_vit = pytest.importorskip("timm.models.vision_transformer")

SHAPES = [dict(dim=64, depth=3, heads=4, patch=4, img_size=32),
          dict(dim=96, depth=2, heads=3, patch=8, img_size=48)]


def timm_twin(vit: model.ViT):
    t = timm_vit.VisionTransformer(img_size=vit.img_size, patch_size=vit.patch, embed_dim=vit.dim,
                                   depth=vit.depth, num_heads=vit.heads, num_classes=0,
                                   global_pool="token", class_token=True)
    t.load_state_dict(model.export_encoder(vit), strict=True)
    return t.eval()


def randomised(vit):
    """Break the init symmetries (zero biases, unit norms) so every parameter matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit.eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_vit_equals_timm_every_block(shape):
    vit = randomised(model.ViT(**shape))
    t = timm_twin(vit)
    x = torch.randn(3, 3, shape["img_size"], shape["img_size"])
    ours = vit.forward_blocks(x, range(1, vit.depth + 1))
    with torch.no_grad():
        h = t.norm_pre(t._pos_embed(t.patch_embed(x)))
        for blk, mine in zip(t.blocks, ours):
            h = blk(h)
            torch.testing.assert_close(mine, h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit(x), t.forward_features(x), atol=1e-5, rtol=1e-5)


def test_sincos_table_matches_the_formula():
    D, gh, gw = 16, 3, 5
    w = [1 / 10000 ** (i / (D / 4)) for i in range(D // 4)]
    ref = np.zeros((gh * gw, D))
    for r in range(gh):
        for c in range(gw):
            for ch in range(D):
                pos, j = (c, ch) if ch < D // 2 else (r, ch - D // 2)  # column first, then row
                ref[r * gw + c, ch] = math.sin(pos * w[j]) if j < D // 4 else math.cos(pos * w[j - D // 4])
    np.testing.assert_allclose(model.sincos_pos_embed(D, gh, gw).numpy(), ref, atol=1e-6)
    vit = model.ViT(dim=D, depth=1, heads=2, patch=4, img_size=12)
    assert vit.pos_embed[0, 0].abs().sum() == 0  # the CLS slot
    assert not vit.pos_embed.requires_grad and "pos_embed" not in dict(vit.named_parameters())


def transcribed_post_norm(vit, x):
    """The data2vec 2.0 path of Eq. (2) of docs/METHOD.md written out with functional ops, block by block."""
    ln = lambda m, t: F.layer_norm(t, (vit.dim,), m.weight, m.bias, 1e-6)  # noqa: E731
    t = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=vit.patch)
    t = t.flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    t = ln(vit.embed_norm, torch.cat([vit.cls_token.expand(len(x), -1, -1), t], 1))
    outs = []
    for b in vit.blocks:
        B, N, D = t.shape
        q, k, v = (t @ b.attn.qkv.weight.T + b.attn.qkv.bias).split(D, -1)
        heads = lambda u: u.reshape(B, N, vit.heads, -1).transpose(1, 2)  # noqa: E731
        a = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // vit.heads)).softmax(-1)
        a = (a @ heads(v)).transpose(1, 2).reshape(B, N, D)
        t = t + a @ b.attn.proj.weight.T + b.attn.proj.bias
        r = ln(b.norm1, t)
        m = F.gelu(r @ b.mlp.fc1.weight.T + b.mlp.fc1.bias) @ b.mlp.fc2.weight.T + b.mlp.fc2.bias
        t = ln(b.norm2, r + m)
        outs.append(t)
    return outs


def test_post_norm_equals_transcription():
    vit = randomised(model.ViT(dim=32, depth=3, heads=2, patch=4, img_size=16, post_norm=True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = transcribed_post_norm(vit, x)
        for mine, r in zip(vit.forward_blocks(x, [1, 2, 3]), ref):
            torch.testing.assert_close(mine, r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit(x), ref[-1])  # no final norm on post-norm models


def test_forward_blocks_runs_no_block_past_the_last_asked():
    vit = model.ViT(dim=32, depth=4, heads=2, patch=4, img_size=16).eval()
    calls = []
    for i, b in enumerate(vit.blocks):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(i + 1))
    x = torch.randn(1, 3, 16, 16)
    outs = vit.forward_blocks(x, [2, 1])
    assert calls == [1, 2] and len(outs) == 2
    torch.testing.assert_close(outs[1], vit.forward_blocks(x, [1])[0])  # order as asked
    with pytest.raises(model.UserError, match="blocks 1..4"):
        vit.forward_blocks(torch.randn(1, 3, 16, 16), [5])


def test_other_resolution_uses_bicubic_positions():
    vit = randomised(model.ViT(dim=32, depth=2, heads=2, patch=4, img_size=32))
    grid = vit.pos_embed[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(vit.grid_pos(4, 4), ref.permute(0, 2, 3, 1).reshape(1, 16, 32))
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 17, 32)
    with pytest.raises(model.UserError, match="not divisible by the patch size 4"):
        vit(torch.randn(1, 3, 18, 18))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = model.ViT(dim=32, depth=2, heads=2, patch=4, img_size=16)
    b = model.ViT(dim=32, depth=2, heads=2, patch=4, img_size=16, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts (docs/METHOD.md §9), each synthesised with its documented key names.

def outputs(vit, x):
    with torch.no_grad():
        return vit.forward_blocks(x, range(1, vit.depth + 1))


def mim_refiner_layout(sd):
    g = math.isqrt(sd["pos_embed"].shape[1] - 1)
    out = {k: v for k, v in sd.items() if k not in ("cls_token", "pos_embed")}
    out["cls_tokens.tokens"] = sd["cls_token"]
    out["pos_embed.embed"] = sd["pos_embed"][:, 1:].reshape(1, g, g, -1)  # no CLS slot
    return {"state_dict": out, "ctor_kwargs": {"dim": sd["cls_token"].shape[-1], "kind": "vit"}}


def data2vec2_layout(sd):
    pre = "modality_encoders.IMAGE."
    out = {pre + "local_encoder.proj." + k.split(".")[-1]: v for k, v in sd.items() if k.startswith("patch_embed")}
    out[pre + "extra_tokens"] = sd["cls_token"]
    out[pre + "fixed_positional_encoder.positions"] = sd["pos_embed"][:, 1:]
    out[pre + "context_encoder.norm.weight"] = sd["embed_norm.weight"]
    out[pre + "context_encoder.norm.bias"] = sd["embed_norm.bias"]
    out.update({k: v for k, v in sd.items() if k.startswith("blocks.")})
    out.update({"_ema": torch.zeros(3), "modality_encoders.IMAGE.decoder.proj.weight": torch.zeros(4, 4),
                "decoder.blocks.0.weight": torch.zeros(2)})  # dropped on load
    return {"model": out, "cfg": {"model": {"depth": 2}}}


LAYOUTS = {
    "mae_full": lambda sd: {"model": {**sd, "mask_token": torch.zeros(1, 1, 8),
                                      "decoder_embed.weight": torch.zeros(8, 32),
                                      "decoder_blocks.0.norm1.weight": torch.zeros(8)}},
    "timm_bare": lambda sd: sd,
    "timm_classifier": lambda sd: {**sd, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)},
    "mim_refiner_ddp": lambda sd: {"state_dict": {"module." + k: v for k, v in
                                                  mim_refiner_layout(sd)["state_dict"].items()}},
    "mim_refiner": mim_refiner_layout,
    "mae_ct": lambda sd: {"state_dict": {**sd, "pos_embed": sd["pos_embed"][:, 1:]}, "ctor_kwargs": {}},
    "own_refine": lambda sd: {"encoder": {k: v * 0 for k, v in sd.items()}, "ema": sd, "arch": None, "step": 3},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pre_norm_layouts_load_and_reproduce(layout, tmp_path):
    vit = randomised(model.ViT(dim=32, depth=2, patch=4, img_size=16))  # heads by width
    path = tmp_path / "ckpt.pth"
    torch.save(LAYOUTS[layout](model.export_encoder(vit)), path)
    loaded = model.load_encoder(str(path)).eval()
    assert loaded.arch() == vit.arch()
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(outputs(loaded, x), outputs(vit, x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["data2vec2", "mim_refiner"])
def test_post_norm_layouts_load_and_reproduce(layout, tmp_path):
    vit = randomised(model.ViT(dim=32, depth=2, patch=4, img_size=16, post_norm=True))
    make = data2vec2_layout if layout == "data2vec2" else mim_refiner_layout
    torch.save(make(model.export_encoder(vit)), tmp_path / "c.pt")
    loaded = model.load_encoder(str(tmp_path / "c.pt")).eval()
    assert loaded.post_norm and loaded.arch() == vit.arch()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), vit(x), atol=0, rtol=0)


def test_timm_state_dict_loads_and_export_loads_back_into_timm(tmp_path):
    t = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                   num_classes=0, global_pool="token").eval()
    torch.save(t.state_dict(), tmp_path / "timm.pth")
    vit = model.load_encoder(str(tmp_path / "timm.pth"), heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), t.forward_features(x), atol=1e-5, rtol=1e-5)
    t2 = timm_twin(vit)  # export -> strict timm load
    with torch.no_grad():
        torch.testing.assert_close(t2(x), vit(x)[:, 0], atol=1e-5, rtol=1e-5)


def test_heads_default_by_width_and_override(tmp_path):
    assert [model.default_heads(d) for d in (768, 1024, 1280, 2560, 384, 192)] == [12, 16, 16, 32, 6, 3]
    sd = model.export_encoder(model.ViT(dim=64, depth=1, heads=4, patch=8, img_size=16))
    torch.save(sd, tmp_path / "e.pth")  # an exported encoder stores its architecture (in `_metadata`)
    vit = model.load_encoder(str(tmp_path / "e.pth"))
    assert (vit.heads, vit.heads_from) == (4, "(stored in the file)")
    torch.save(dict(sd), tmp_path / "bare.pth")  # a plain dict, as others write: the count follows the width
    vit = model.load_encoder(str(tmp_path / "bare.pth"))
    assert vit.heads == 1 and "by width" in vit.heads_from
    assert model.load_encoder(str(tmp_path / "bare.pth"), heads=4).heads == 4


def test_wrong_files_fail_with_a_readable_error(tmp_path):
    sd = model.export_encoder(model.ViT(dim=32, depth=2, heads=2, patch=4, img_size=16))
    torch.save({**sd, "fc_norm.weight": torch.zeros(32)}, tmp_path / "extra.pth")
    with pytest.raises(model.UserError, match=r"unexpected keys \['fc_norm.weight'\]"):
        model.load_encoder(str(tmp_path / "extra.pth"))
    del sd["norm.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(model.UserError, match=r"missing keys \['norm.weight'\]"):
        model.load_encoder(str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(model.UserError, match="not a ViT encoder"):
        model.load_encoder(str(tmp_path / "resnet.pth"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(model.UserError, match="not a readable weights-only checkpoint"):
        model.load_encoder(str(tmp_path / "notes.txt"))
    with pytest.raises(model.UserError, match="does not exist"):
        model.load_encoder(str(tmp_path / "nope.pth"))


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(model.UserError, match="weights-only"):
        model.load_encoder(str(tmp_path / "evil.pth"))
    assert "code ran" not in capsys.readouterr().out


def test_importing_model_has_no_side_effects(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import model; from util import common"], capture_output=True,
                         text=True, cwd=str(__import__("pathlib").Path(model.__file__).parent))
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS) - {"own_refine"}))
def test_safetensors_of_every_layout(layout, tmp_path):
    """A .safetensors file holds one flat state dict: every key convention above is read from it."""
    from safetensors.torch import save_file
    vit = randomised(model.ViT(dim=32, depth=2, patch=4, img_size=16))
    obj = LAYOUTS[layout](model.export_encoder(vit))
    sd = obj.get("model", obj.get("state_dict", obj))
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    loaded = model.load_encoder(str(tmp_path / "w.safetensors")).eval()
    assert loaded.arch() == vit.arch()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), vit(x), atol=0, rtol=0)


def test_mae_training_checkpoint_with_args_is_read_safely(tmp_path):
    """MAE's own checkpoint-N.pth: {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}."""
    import argparse
    vit = model.ViT(dim=32, depth=2, patch=4, img_size=16)
    args = argparse.Namespace(model="mae_vit_large_patch16", input_size=224, norm_pix_loss=True, lr=None)
    torch.save({"model": model.export_encoder(vit), "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": args}, tmp_path / "checkpoint-799.pth")
    assert model.load_encoder(str(tmp_path / "checkpoint-799.pth")).arch() == vit.arch()
    torch.save({"model": model.export_encoder(vit), "extra": np.float64(1.0)}, tmp_path / "other.pth")
    with pytest.raises(model.UserError) as e:
        model.load_encoder(str(tmp_path / "other.pth"))
    text = str(e.value)
    assert "holds a pickled numpy" in text and "only if you trust the file" in text and "['model']" in text
    assert "\n" not in text and text.endswith("'weights.pth')")

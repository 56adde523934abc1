"""smear.Block against autograd's finite differences, a pure-PyTorch SMEAR block written the
way the official code runs it, and DistributedDataParallel over gloo."""

import os
import tempfile
import unittest

import torch
import torch.nn.functional as F

import smear

D, M, N = 6, 3, 4


def smear_reference(block, x, lengths=None, official=False):
    """The SMEAR block in plain PyTorch, from the Block's own parameters: pool (masked or plain
    mean), LayerNorm, the router (official: its weight rows layer-normalised, no bias), softmax;
    merge the adapters with einsum over the expert axis, apply with bmm, add x; padding rows 0."""
    B, L, d = x.shape
    m = block.expert_tensor("down.bias").shape[1]
    down, down_bias, up = (block.expert_tensor(n) for n in ("down.weight", "down.bias", "up.weight"))
    valid = torch.ones(B, L, dtype=torch.bool) if lengths is None else (
        torch.arange(L)[None, :] < torch.as_tensor(lengths)[:, None])
    mask = valid.to(x.dtype)[:, :, None]
    pooled = x.mean(1) if official else (x * mask).sum(1) / mask.sum(1)
    r = block.router
    h = F.layer_norm(pooled, (d,), r.layer_norm.weight, r.layer_norm.bias, 1e-5)
    if official:
        w = F.layer_norm(r.weight, (d,), r.weight_norm.weight, r.weight_norm.bias, 1e-5)
        logits = h @ w.t()
    else:
        logits = h @ r.weight.t() + r.bias
    p = torch.softmax(logits, dim=-1)
    merged_down = torch.einsum("be,edm->bdm", p, down)
    merged_bias = torch.einsum("be,em->bm", p, down_bias)
    merged_up = torch.einsum("be,emd->bmd", p, up)
    hidden = F.silu(torch.bmm(x, merged_down) + merged_bias[:, None, :])
    assert hidden.shape[-1] == m
    return (x + torch.bmm(hidden, merged_up)) * mask


def randomised(block, scale=0.3, seed=5):
    """The block with every parameter drawn at a scale where routing is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return block


class BlockTest(unittest.TestCase):
    def test_parameters_are_named_shaped_and_share_the_layers_storage(self):
        block = smear.Block("adapter", d=D, m=M, experts=N)
        names = dict(block.named_parameters())
        self.assertEqual(sorted(names), ["experts", "router.bias", "router.layer_norm.bias",
                                         "router.layer_norm.weight", "router.weight"])
        self.assertEqual(tuple(block.experts.shape), (N, 2 * D * M + M))
        self.assertEqual(tuple(block.router.weight.shape), (N, D))
        self.assertEqual(tuple(block.expert_tensor("up.weight").shape), (N, M, D))
        x = torch.randn(2, 3, D)
        y0 = block(x)
        with torch.no_grad():
            block.expert_tensor("up.weight").add_(1.0)  # written in place: the C++ layer sees it
        self.assertFalse(torch.allclose(block(x), y0))

    def test_equals_a_pure_pytorch_smear_block(self):
        torch.manual_seed(0)
        for official, lengths in ((False, [5, 2, 4]), (False, None), (True, None)):
            with self.subTest(official=official, lengths=lengths):
                block = randomised(smear.Block("adapter", d=D, m=M, experts=N, dtype=torch.float64,
                                               preset="official" if official else None))
                x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
                y = block(x, lengths)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, [x, *block.parameters()], dy)
                x2 = x.detach().clone().requires_grad_(True)
                y_ref = smear_reference(block, x2, lengths, official)
                grads_ref = torch.autograd.grad(y_ref, [x2, *block.parameters()], dy)
                torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
                for g, g_ref in zip(grads, grads_ref):
                    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)

    def test_gradcheck_every_exact_strategy(self):
        cases = [("smear", {}), ("ensemble", {}), ("tag", {}), ("hash", {}), ("soft_moe", {}),
                 ("switch", {}), ("smear", {"preset": "official"}), ("smear", {"segment_length": 2})]
        for strategy, options in cases:
            for expert in ("adapter", "lora", "linear"):
                with self.subTest(strategy=strategy, expert=expert, **options):
                    sizes = {"adapter": {"m": 2}, "lora": {"rank": 2, "out": 3}, "linear": {"out": 4}}[expert]
                    if expert != "adapter" and strategy == "smear" and "segment_length" not in options:
                        sizes = dict(sizes, init_std=0.5)  # lora's B starts at 0: make every path non-zero
                    block = smear.Block(expert, d=4, experts=4, strategy=strategy, dtype=torch.float64, seed=3,
                                        **sizes, **options)
                    randomised(block, seed=7)
                    x = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
                    lengths = None if "segment_length" in options else [4, 2, 3]
                    tags = [0, 2, 1]
                    params = list(block.parameters())
                    self.assertTrue(torch.autograd.gradcheck(lambda x, *ps: block(x, lengths, tags),
                                                             (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5))

    def test_inference_cache_is_kept_until_a_parameter_is_written(self):
        block = randomised(smear.Block("adapter", d=D, m=M, experts=N, strategy="latent_skills", tasks=3))
        block.eval()
        x, tags = torch.randn(2, 3, D), [0, 2]
        y0 = block(x, tags=tags)
        torch.testing.assert_close(block(x, tags=tags), y0, rtol=0, atol=0)
        self.assertEqual(block.cache_builds, 1)  # merged once, reused
        opt = torch.optim.SGD(block.parameters(), lr=0.5)
        block.experts.grad = torch.ones_like(block.experts)
        opt.step()  # an in-place write: the next forward merges again
        y1 = block(x, tags=tags)
        self.assertEqual(block.cache_builds, 2)
        self.assertFalse(torch.allclose(y0, y1))

    def test_float32_matches_float64(self):
        b64 = randomised(smear.Block("adapter", d=D, m=M, experts=N, dtype=torch.float64))
        b32 = smear.Block("adapter", d=D, m=M, experts=N, dtype=torch.float32)
        b32.load_state_dict({k: v.float() for k, v in b64.state_dict().items()})
        x = torch.randn(2, 3, D, dtype=torch.float64)
        torch.testing.assert_close(b32(x.float()).double(), b64(x), rtol=1e-5, atol=1e-6)

    def test_state_dict_and_torch_save_round_trip(self):
        a = randomised(smear.Block("adapter", d=D, m=M, experts=N))
        b = smear.Block("adapter", d=D, m=M, experts=N, seed=9)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "block.pt")
            torch.save(a.state_dict(), path)
            b.load_state_dict(torch.load(path))
        x = torch.randn(2, 3, D)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)

    def test_gradients_accumulate_as_autograd_adds_them(self):
        block = randomised(smear.Block("adapter", d=D, m=M, experts=N, dtype=torch.float64))
        x = torch.randn(2, 3, D, dtype=torch.float64)
        block(x).sum().backward()
        once = block.experts.grad.clone()
        block(x).sum().backward()
        torch.testing.assert_close(block.experts.grad, 2 * once, rtol=1e-14, atol=0)
        # two forwards, then one backward through both: each call's gradient counts
        block.zero_grad()
        (block(x).sum() + block(2 * x).sum()).backward()
        g_both = block.experts.grad.clone()
        block.zero_grad()
        block(x).sum().backward()
        block(2 * x).sum().backward()
        torch.testing.assert_close(g_both, block.experts.grad, rtol=1e-13, atol=1e-15)

    def test_bad_input_raises_python_exceptions(self):
        block = smear.Block("adapter", d=D, m=M, experts=N)
        with self.assertRaisesRegex(smear.ShapeError, "the experts expect d = 6"):
            block(torch.randn(2, 3, D + 1))
        with self.assertRaisesRegex(smear.InvalidValueError, "x is torch.float64, the block is torch.float32"):
            block(torch.randn(2, 3, D, dtype=torch.float64))
        with self.assertRaisesRegex(smear.ShapeError, "expected \\[B, L, d\\]"):
            block(torch.randn(6, D))
        with self.assertRaisesRegex(smear.ShapeError, "lengths has 3 entries, expected B = 2"):
            block(torch.randn(2, 3, D), [1, 2, 3])
        with self.assertRaisesRegex(smear.InvalidValueError, "has length 4"):
            block(torch.randn(2, 3, D), [1, 4])
        with self.assertRaisesRegex(smear.InvalidValueError, "not compiled into the module"):
            smear.Block("adapter", d=D, m=M, experts=3)
        with self.assertRaisesRegex(smear.InvalidValueError, "unknown option 'tempreature'"):
            smear.Block("adapter", d=D, m=M, experts=N, tempreature=2.0)
        with self.assertRaisesRegex(smear.InvalidValueError, "option pool = 'max'; known: masked_mean, mean"):
            smear.Block("adapter", d=D, m=M, experts=N, pool="max")
        with self.assertRaisesRegex(smear.InvalidValueError, "option k = 'two' has the wrong type"):
            smear.Block("adapter", d=D, m=M, experts=N, k="two")
        with self.assertRaisesRegex(smear.InvalidValueError, "unknown strategy"):
            smear.Block("adapter", d=D, m=M, experts=N, strategy="gumbel")
        with self.assertRaisesRegex(smear.InvalidValueError, "temperature must be positive"):
            smear.Block("adapter", d=D, m=M, experts=N, temperature=0.0)
        checked = smear.Block("adapter", d=D, m=M, experts=N, check_finite=True)
        x = torch.randn(2, 3, D)
        x[1, 2, 0] = float("nan")
        with self.assertRaisesRegex(smear.NumericError, "nan"):
            checked(x)
        # a non-contiguous x is handled (copied), and gives what its contiguous copy gives
        xt = torch.randn(2, D, 3).transpose(1, 2)
        torch.testing.assert_close(block(xt), block(xt.contiguous()), rtol=0, atol=0)
        self.assertTrue(issubclass(smear.ShapeError, ValueError))


def _ddp_worker(rank, world, init_file, x, steps, out_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    block = randomised(smear.Block("adapter", d=D, m=M, experts=N, dtype=torch.float64, threads=1), seed=rank + 1)
    model = torch.nn.parallel.DistributedDataParallel(block)  # broadcasts rank 0's parameters
    opt = torch.optim.AdamW(block.param_groups(0.01), lr=1e-2)
    share = x.shape[0] // world
    for _ in range(steps):
        opt.zero_grad()
        y = model(x[rank * share:(rank + 1) * share])
        (y ** 2).mean().backward()  # DDP averages the ranks' gradients: the mean over the whole batch
        opt.step()
    if rank == 0:
        torch.save(block.state_dict(), out_file)
    torch.distributed.destroy_process_group()


@unittest.skipUnless(torch.distributed.is_available(), "torch.distributed is not available")
class DistributedTest(unittest.TestCase):
    def test_ddp_over_gloo_matches_one_process_on_the_whole_batch(self):
        torch.manual_seed(3)
        x = torch.randn(8, 5, D, dtype=torch.float64)
        steps = 3
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "ddp.pt")
            torch.multiprocessing.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), x, steps, out), nprocs=2)
            ddp = torch.load(out)
        block = randomised(smear.Block("adapter", d=D, m=M, experts=N, dtype=torch.float64), seed=1)
        opt = torch.optim.AdamW(block.param_groups(0.01), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            (block(x) ** 2).mean().backward()
            opt.step()
        moved = False
        for name, value in block.state_dict().items():
            torch.testing.assert_close(ddp[name], value, rtol=1e-10, atol=1e-12)
            moved = moved or not torch.equal(value, randomised(smear.Block(
                "adapter", d=D, m=M, experts=N, dtype=torch.float64), seed=1).state_dict()[name])
        self.assertTrue(moved)


if __name__ == "__main__":
    unittest.main()

"""smear.Block in training and with weights from outside: smear's AdamW against
torch.optim.AdamW, PEFT LoRA adapters (written by tests/io/peft_files.py, independently of
smear) as experts, and the plain-adapter preset against a plain PyTorch block."""

import importlib.util
import os
import tempfile
import unittest

import torch
import torch.nn.functional as F

import smear
from test_block import randomised

HERE = os.path.dirname(os.path.abspath(__file__))


def peft_files():
    """tests/io/peft_files.py as a module (its writer and the values it writes)."""
    spec = importlib.util.spec_from_file_location(
        "peft_files", os.path.join(HERE, "..", "..", "tests", "io", "peft_files.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TrainingTest(unittest.TestCase):
    def test_torch_adamw_matches_smears_adamw(self):
        options = dict(d=6, m=3, experts=4, dtype=torch.float64)
        for strategy in ("smear", "soft_moe"):
            with self.subTest(strategy=strategy):
                a = randomised(smear.Block("adapter", strategy=strategy, **options))
                b = smear.Block("adapter", strategy=strategy, seed=11, **options)
                b.load_state_dict(a.state_dict())
                start = {k: v.clone() for k, v in a.state_dict().items()}
                torch_opt = torch.optim.AdamW(a.param_groups(0.1), lr=0.05, betas=(0.8, 0.99), eps=1e-7)
                smear_opt = smear.AdamW(b, lr=0.05, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
                x = torch.randn(3, 5, 6, dtype=torch.float64)
                lengths = [5, 2, 4]
                for _ in range(4):
                    for block, opt in ((a, torch_opt), (b, smear_opt)):
                        opt.zero_grad()
                        (block(x, lengths) ** 2).sum().backward()
                        opt.step()
                self.assertEqual(smear_opt.steps, 4)
                for name, value in a.state_dict().items():
                    torch.testing.assert_close(b.state_dict()[name], value, rtol=1e-12, atol=1e-14, msg=name)
                    self.assertFalse(torch.equal(value, start[name]), name)  # every tensor moved
                torch.testing.assert_close(b(x, lengths), a(x, lengths), rtol=1e-12, atol=1e-14)

    def test_peft_adapters_are_experts_and_save_back(self):
        pf = peft_files()
        with tempfile.TemporaryDirectory() as root:
            pf.write(root)
            dirs = [os.path.join(root, "adapter_%d" % e) for e in range(pf.ADAPTERS)]
            block = smear.Block.from_peft(dirs, pf.MODULE, os.path.join(root, "base", "model.safetensors"),
                                          strategy="tag", dtype=torch.float64)
            self.assertEqual(block.describe()["expert.rank"], str(pf.R))
            expected = {}
            _, tensors = pf.read_safetensors(os.path.join(root, "expected.safetensors"))
            for name, (_, shape, vals) in tensors.items():
                expected[name] = torch.tensor(vals, dtype=torch.float64).view(*shape)
            y = block(expected["x"], tags=list(range(pf.ADAPTERS)))
            torch.testing.assert_close(y, expected["y"], rtol=1e-12, atol=1e-13)

            # trained in SMEAR, saved back as PEFT adapters: the script's checker reads them
            with torch.no_grad():
                block.expert_tensor("lora_b").mul_(0.5)
            saved = [os.path.join(root, "saved_%d" % e) for e in range(pf.ADAPTERS)]
            block.save_peft(saved, pf.MODULE, base_model="t5-small")
            again = smear.Block.from_peft(saved, pf.MODULE, os.path.join(root, "base", "model.safetensors"),
                                          dtype=torch.float64)
            torch.testing.assert_close(again.experts, block.experts, rtol=0, atol=0)

            before = block.experts.clone()
            bad = list(dirs)
            bad[1] = os.path.join(root, "bad_rank")
            with self.assertRaisesRegex(smear.IoError, "has rank 3, in 6, out 5; the experts have rank 4"):
                block.load_peft(bad, pf.MODULE)
            bad[1] = os.path.join(root, "bad_target")
            with self.assertRaisesRegex(smear.IoError, r"target_modules \(k, o\) do not include"):
                block.load_peft(bad, pf.MODULE)
            torch.testing.assert_close(block.experts, before, rtol=0, atol=0)
            with self.assertRaisesRegex(smear.InvalidValueError, "load into a block of lora experts"):
                smear.Block("adapter", d=6, m=2, experts=4).load_peft(dirs, pf.MODULE)

    def test_plain_preset_is_a_plain_pytorch_adapter_block(self):
        block = randomised(smear.Block("adapter", d=5, m=3, experts=2, preset="plain", dtype=torch.float64))
        self.assertEqual(sorted(dict(block.named_parameters())), ["experts", "router.bias", "router.weight"])
        x = torch.randn(2, 4, 5, dtype=torch.float64)
        down, down_b, up, up_b = (block.expert_tensor(n) for n in ("down.weight", "down.bias", "up.weight", "up.bias"))
        p = torch.softmax(x.mean(1) @ block.router.weight.t() + block.router.bias, dim=-1)
        merged = [torch.einsum("be,e...->b...", p, t) for t in (down, down_b, up, up_b)]
        hidden = F.relu(torch.bmm(x, merged[0]) + merged[1][:, None, :])
        y_ref = x + torch.bmm(hidden, merged[2]) + merged[3][:, None, :]
        torch.testing.assert_close(block(x), y_ref, rtol=1e-12, atol=1e-14)


if __name__ == "__main__":
    unittest.main()

"""smear for PyTorch: a SMEAR routing block (or any strategy smear implements) as a torch.nn.Module.

The forward and backward passes run in smear's C++ layer on the cpu backend (smear._smear),
inside a torch.autograd.Function; the parameters are ordinary torch.nn.Parameters that view the
C++ layer's own storage, so optimisers, state_dict(), load_state_dict() and torch.save work on
them as on any module's.

    import torch, smear
    block = smear.Block("adapter", d=768, m=64, experts=8)            # SMEAR over 8 adapters
    y = block(x, lengths)                                              # x [B, L, 768]
    y.sum().backward()                                                 # block.experts.grad, ...

Gradients: each backward returns this call's gradients to autograd, which adds them to each
parameter's .grad as for any module (so gradients accumulate until optimizer.zero_grad(), and
DistributedDataParallel's hooks see them). The C++ layer's own gradient buffers are scratch.

See python/README.md for the expert types, their tensors and the options.
"""

import torch

from . import _smear
from ._smear import IoError, InvalidValueError, NumericError, ShapeError, StateError, compiled_counts

__all__ = ["Block", "AdamW", "ShapeError", "InvalidValueError", "NumericError", "StateError", "IoError", "compiled_counts"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


class _Apply(torch.autograd.Function):
    """y = block(x; θ). Inputs: the Block, x, lengths, tags, then the parameters in order."""

    @staticmethod
    def forward(ctx, block, x, lengths, tags, *params):
        core = block._core
        block._load(params)
        seed = int(torch.randint(0, 2**63 - 1, (1,)).item())  # smear's draws follow torch's generator
        y = block._run_forward(x, lengths, tags, seed)
        ctx.block, ctx.seed, ctx.training, ctx.call = block, seed, core.training, block._calls
        ctx.lengths, ctx.tags = lengths, tags
        ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        block = ctx.block
        core = block._core
        x, *params = ctx.saved_tensors
        if block._pending != ctx.call:
            # the layer's last forward is another call's (or this call was already gone back
            # through, e.g. by gradcheck): run this one again, with the same draws
            if core.training != ctx.training:
                raise StateError("smear.Block: backward through a forward in another mode (train/eval) than the "
                                 "block's now, after a later forward; go back through each forward before the next")
            block._load(params)
            block._run_forward(x, ctx.lengths, ctx.tags, ctx.seed)
        losses = block._take_losses(x.shape[0])
        core.zero_grad()
        dx = torch.empty_like(x)
        dy = dy.detach().to(x.dtype).contiguous()
        core.backward(dy.numpy(), dx.numpy(), losses)
        block._pending = None
        grads = [g.clone() for g in block._grads]
        return (None, dx, None, None, *grads)


class Block(torch.nn.Module):
    """A routing block of `experts` experts of one type, run by smear's C++ layer.

    expert: "adapter" (d -> m -> d bottleneck, the residual added), "lora" (d -> out, rank
    `rank`, over a frozen base map) or "linear" (d -> out). experts: N, one of
    smear.compiled_counts. strategy: smear, ensemble, st_gumbel, reinforce, dselect, switch,
    tag, hash, adamix, latent_skills, random, cluster, soft_moe. preset: None, "official" or
    "official_resnet" (the official SMEAR code's router and estimator settings). dtype:
    torch.float32 or torch.float64. base_weight, base_bias (lora): the frozen map in
    torch.nn.Linear's layout, weight [out, d] and bias [out]. Other keywords are smear's
    options by name (python/README.md lists them), e.g. k=2, temperature=0.5, layer_norm=False,
    pool="mean", activation="relu", up_bias=True, threads=2.

    Parameters: `experts` [N, P] (expert e's tensors, flattened in its layout's order: see
    expert_tensor()), then the router's and the strategy's tensors under their smear names
    (router.weight [N, d], router.bias, router.layer_norm.weight, ...).
    """

    def __init__(self, expert="adapter", *, d, m=None, rank=None, out=None, experts=8, strategy="smear",
                 preset=None, dtype=torch.float32, seed=0, base_weight=None, base_bias=None, **options):
        super().__init__()
        if dtype not in _DTYPES:
            raise InvalidValueError(f"smear.Block: dtype must be torch.float32 or torch.float64, got {dtype}")
        width = {"adapter": m, "lora": rank}.get(expert)
        if expert in ("adapter", "lora") and width is None:
            raise InvalidValueError(f"smear.Block: a {expert} expert needs {'m' if expert == 'adapter' else 'rank'}")
        out_dim = d if expert == "adapter" else out
        if out_dim is None:
            raise InvalidValueError(f"smear.Block: a {expert} expert needs out (its output dimension)")
        frozen_w = frozen_b = None
        if base_weight is not None:  # torch.nn.Linear's [out, in] -> smear's [in, out]
            base_weight = torch.as_tensor(base_weight).detach()
            if base_weight.shape != (out_dim, d):
                raise ShapeError(f"smear.Block: base_weight is {list(base_weight.shape)}, expected [out, d] = "
                                 f"[{out_dim}, {d}] (torch.nn.Linear's layout)")
            frozen_w = base_weight.t().contiguous().to(dtype).numpy()
        if base_bias is not None:
            frozen_b = torch.as_tensor(base_bias).detach().contiguous().to(dtype).numpy()
        self.dtype = dtype
        self._core = _smear.Block(expert, _DTYPES[dtype], experts, d, out_dim, width or 0, strategy, preset or "",
                                  seed, frozen_w, frozen_b, options)
        self._params, self._values, self._grads = [], [], []
        for name, value, grad, decay in self._core.parameters():
            param = torch.nn.Parameter(torch.from_numpy(value))
            param.smear_decay = decay  # smear's AdamW decays this tensor (param_groups())
            owner, leaf = self._owner(name)
            owner.register_parameter(leaf, param)
            self._params.append(param)
            self._values.append(param.data)  # the tensors that view the C++ storage
            self._grads.append(torch.from_numpy(grad))
        self._layout = {name: (offset, tuple(shape)) for name, offset, shape in self._core.expert_layout()}
        self._versions = None  # the parameters' versions the C++ layer last saw (_load)
        self._calls = 0       # forwards run
        self._pending = None  # the call the C++ layer can go back through now
        self._losses = None
        self._core.train(self.training)

    def _owner(self, dotted):
        """The (sub)module that holds parameter `dotted`, made on first use, and its last name."""
        *path, leaf = dotted.split(".")
        owner = self
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, torch.nn.Module())
            owner = owner._modules[part]
        return owner, leaf

    # -- what the autograd function uses ------------------------------------------------------
    def _load(self, params):
        """Makes the C++ layer compute with `params`: a parameter that no longer views its storage
        (replaced by load_state_dict(assign=True), .data = ..., a clone) is copied into it. Merged
        experts cached for inference end when a parameter was written (its version moved)."""
        for p, home in zip(params, self._values):
            if p.data_ptr() != home.data_ptr():
                if p.shape != home.shape or p.dtype != home.dtype:
                    raise ShapeError(f"smear.Block: a parameter is {list(p.shape)} {p.dtype}, the block's is "
                                     f"{list(home.shape)} {home.dtype}")
                home.copy_(p.detach())
        versions = [p._version for p in params] + [home._version for home in self._values]
        if versions != self._versions:
            self._core.invalidate_cache()
            self._versions = versions

    def _run_forward(self, x, lengths, tags, seed):
        self._core.reseed(seed)
        y = torch.empty(x.shape[0], x.shape[1], self._core.output_dim, dtype=x.dtype)
        self._core.forward(x.detach().numpy(), lengths, tags, y.numpy())
        self._calls += 1
        self._pending = self._calls
        return y

    def _take_losses(self, batch):
        losses, self._losses = self._losses, None
        if self._core.needs_losses and losses is None:
            raise InvalidValueError("smear.Block: this strategy (REINFORCE) needs each example's loss: call "
                                    "block.set_example_losses(loss_per_example) before backward()")
        return losses

    # -- the public interface ------------------------------------------------------------------
    def forward(self, x, lengths=None, tags=None):
        """y = block(x): x [B, L, d] of the block's dtype; lengths [B] (valid tokens per example,
        right padding) and tags [B] (task ids, for tag and latent-skill routing) optional."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"smear.Block: x must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise InvalidValueError(f"smear.Block: x is on {x.device}; this block runs on the CPU")
        if x.dtype != self.dtype:
            raise InvalidValueError(f"smear.Block: x is {x.dtype}, the block is {self.dtype} "
                                    f"(convert x, or build the block with dtype={x.dtype})")
        if x.dim() != 3:
            raise ShapeError(f"smear.Block: x is {list(x.shape)}, expected [B, L, d]")
        if self._core.training != self.training:
            self._core.train(self.training)
        x = x.contiguous()
        return _Apply.apply(self, x, _ints(lengths, "lengths"), _ints(tags, "tags"), *self._params)

    def invalidate_cache(self):
        """Ends merged experts cached for inference: needed only after writing parameters in a way
        their versions do not see (through .data, or numpy views)."""
        self._core.invalidate_cache()

    # -- PEFT LoRA adapters (smear/io/peft.hpp) --------------------------------------------------
    @classmethod
    def from_peft(cls, dirs, module, base, *, strategy="smear", dtype=torch.float32, **options):
        """A block of len(dirs) lora experts, expert e being `module`'s LoRA in the PEFT adapter
        directory dirs[e] (adapter_config.json, adapter_model.safetensors), over the frozen map
        `module`.weight / .bias read from the base model's safetensors file `base`. Rank and
        scale come from the first adapter's config; every adapter must match them (smear.IoError
        naming the directory otherwise)."""
        dirs = [str(d) for d in dirs]
        if not dirs:
            raise InvalidValueError("smear.Block.from_peft: no adapter directories")
        config = _smear.peft_config(dirs[0], module)
        w, base_bias = _smear.peft_base(str(base), module, config["fan_in_fan_out"])
        base_weight = torch.from_numpy(w).t()  # smear's [in, out] -> torch.nn.Linear's [out, in]
        block = cls("lora", d=base_weight.shape[1], out=base_weight.shape[0], rank=config["rank"],
                    experts=len(dirs), strategy=strategy, dtype=dtype, base_weight=base_weight,
                    base_bias=base_bias, alpha=config["scaling"] * config["rank"], **options)
        block.load_peft(dirs, module)
        return block

    def load_peft(self, dirs, module):
        """Loads `module`'s LoRA of the PEFT adapter directory dirs[e] into expert e (lora
        experts only); all or nothing: smear.IoError for a rank, shape, scale or target module
        other than the block's, naming the file."""
        self._load(self._params)
        self._core.load_peft([str(d) for d in dirs], module)
        self._changed_in_cpp()

    def save_peft(self, dirs, module, base_model=""):
        """Writes expert e as `module`'s LoRA in the PEFT adapter directory dirs[e], which PEFT's
        PeftModel.from_pretrained(base, dirs[e]) loads (lora experts only)."""
        self._load(self._params)
        self._core.save_peft([str(d) for d in dirs], module, base_model)

    def _changed_in_cpp(self):
        """The C++ layer wrote its parameters: make every Parameter view them again, and the next
        forward end the inference cache (_load)."""
        with torch.no_grad():
            for p, home in zip(self._params, self._values):
                if p.data_ptr() != home.data_ptr():
                    p.data = home
        self._versions = None

    def set_example_losses(self, losses):
        """Each example's loss [B] for the next backward (REINFORCE's score-function term)."""
        self._losses = torch.as_tensor(losses).detach().to(self.dtype).contiguous().numpy()

    def expert_tensor(self, name):
        """Every expert's tensor `name` (e.g. "down.weight") as a view of `experts`, [N, *shape]."""
        if name not in self._layout:
            raise InvalidValueError(f"smear.Block: the expert has no tensor '{name}'; it has "
                                    f"{', '.join(self._layout)}")
        offset, shape = self._layout[name]
        size = 1
        for s in shape:
            size *= s
        return self.experts[:, offset:offset + size].view(self.experts.shape[0], *shape)

    def expert_layout(self):
        """{name: (offset, shape)} of the tensors in a row of `experts`."""
        return dict(self._layout)

    def param_groups(self, weight_decay):
        """Two optimiser groups as smear's own AdamW decays: the experts and router.weight (and
        Soft MoE's weight) with `weight_decay`, the rest without."""
        return [{"params": [p for p in self._params if p.smear_decay], "weight_decay": weight_decay},
                {"params": [p for p in self._params if not p.smear_decay], "weight_decay": 0.0}]

    def routing(self):
        """The distribution over experts of the last forward, [B, N] (a copy)."""
        return torch.from_numpy(self._core.routing())

    def choices(self):
        """The experts each example of the last forward ran, [B, k]."""
        return torch.from_numpy(self._core.choices())

    def describe(self):
        """What the block computes, as smear's checkpoints record it."""
        return self._core.describe()

    @property
    def cache_builds(self):
        """How many times merged experts were cached for inference (latent skills, AdaMix, task routing)."""
        return self._core.cache_builds

    @property
    def auxiliary_loss(self):
        """The regularisers backward() differentiates with the caller's loss (DSelect-k, REINFORCE)."""
        return self._core.auxiliary_loss

    def extra_repr(self):
        info = self._core.describe()
        return ", ".join(f"{k}={v}" for k, v in info.items() if not k.startswith("router."))


def _ints(v, what):
    """An optional [B] int32 array for the C++ layer."""
    if v is None:
        return None
    t = torch.as_tensor(v)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise InvalidValueError(f"smear.Block: {what} must hold integers, got {t.dtype}")
    return t.detach().to(torch.int32).contiguous().numpy()


class AdamW:
    """smear's own AdamW (smear::adamw: the C++ update, run in place on the block's storage) over
    a Block's parameters, for checking against torch.optim.AdamW or training without an autograd
    optimiser. The update is torch.optim.AdamW's; weight decay applies to the tensors smear
    decays (the experts, router.weight; param_groups() gives PyTorch the same split). step()
    reads each parameter's .grad (a parameter without one steps with a zero gradient, where
    torch.optim skips it)."""

    def __init__(self, block, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self._block = block
        self._core = block._core.adamw(lr, betas[0], betas[1], eps, weight_decay)

    @property
    def steps(self):
        return self._core.steps

    def zero_grad(self, set_to_none=True):
        for p in self._block._params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self):
        b = self._block
        b._load(b._params)
        for p, g in zip(b._params, b._grads):
            if p.grad is None:
                g.zero_()
            else:
                g.copy_(p.grad)
        self._core.step()
        b._changed_in_cpp()

"""The model and everything that updates it, in bp or local mode.

- ``bp``: one optimizer over the whole model; loss = task loss + λ_ortho · penalty.
- ``local`` (ENN-ℓ): the model is cut into K blocks (:func:`enn_neuro.models.split_model`),
  each with a pooled head and its own optimizer and scheduler. Each block reads the previous
  block's output *detached* and minimises its own head's task loss plus λ_ortho · its own
  penalty; the blocks are updated one after another within a batch, so only one block's
  autograd graph is alive at a time. Prediction uses the last block's head (the model's
  classifier); every head's output is kept for early-exit reporting.

Tensors are ``(B, C, D, H, W)`` volumes (or ``(B, C, H, W)`` images); targets are class
indices ``(B,)`` or values ``(B,)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from enn_neuro.config import Config
from enn_neuro.enn import (
    orthogonality_drift,
    retract_,
    scheduled_penalty,
    weight_decay_groups,
)
from enn_neuro.models import create_model, split_model
from enn_neuro.training.distributed import DistributedContext

__all__ = ["Learner", "NonFiniteLossError", "StepResult", "resolve_device"]


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or infinite; the message names fold, epoch and step."""


@dataclass
class StepResult:
    """Losses of one training step (floats, for logging)."""

    loss: float
    task_loss: float
    penalty: float
    block_losses: list[float]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device is {name!r} but CUDA is not available")
    return device


class Learner:
    """Model, local blocks and heads, optimizers, schedulers, and the training step.

    Args:
        config: The study configuration.
        num_outputs: Classes (classification) or 1 (regression).
        device: Where to train.
        target_mean: Mean of the training targets (regression; the model predicts z-scores).
        target_std: Their standard deviation.
    """

    def __init__(
        self,
        config: Config,
        num_outputs: int,
        device: torch.device,
        target_mean: float = 0.0,
        target_std: float = 1.0,
        context: DistributedContext | None = None,
    ) -> None:
        self.config = config
        self.context = context or DistributedContext()
        self.task = config.data.task
        self.device = device
        self.target_mean = float(target_mean)
        self.target_std = float(target_std) if target_std > 0 else 1.0
        model_config = config.model
        self.model = create_model(
            model_config.name,
            spatial_dims=config.spatial_dims,
            in_channels=config.in_channels,
            num_classes=num_outputs,
            layer=model_config.layer,
            norm=model_config.norm,
            base_width=model_config.base_width,
            zero_init_residual=model_config.zero_init_residual,
        ).to(device)
        # 2D convolutions on GPUs run fastest on NHWC tensors
        self.channels_last = device.type == "cuda" and config.spatial_dims == 2
        self.sync_batchnorm = (
            self.context.enabled and device.type == "cuda" and model_config.norm == "batch"
        )
        self.model = self._for_device(self.model)

        # one optimizer for the whole model (bp) or one per local block
        training = config.training
        if training.mode == "local":
            self.blocks = split_model(self.model, training.local.cut, training.local.head).to(
                device
            )
            for block in self.blocks[:-1]:  # the last block's head is the model's classifier
                block.head = self._for_device(block.head)  # a 1×1 conv head has a BatchNorm
            self.heads = nn.ModuleList([block.head for block in self.blocks[:-1]])
            trained = list(self.blocks)
        else:
            self.blocks = None
            self.heads = nn.ModuleList()
            trained = [self.model]
        self.optimizers = [_optimizer(module, config) for module in trained]

        # what the steps run: DDP wrappers averaging gradients over ranks, or the modules
        # (in local mode only the blocks train: no wrapper, and no gradient buckets, for the
        # whole model)
        self.train_model = self._data_parallel(self.model) if self.blocks is None else self.model
        self.train_blocks = (
            None if self.blocks is None else [self._data_parallel(b) for b in self.blocks]
        )
        self.schedulers = [_scheduler(optimizer, config) for optimizer in self.optimizers]
        use_fp16 = training.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
        self.amp_dtype = torch.float16 if use_fp16 else torch.bfloat16
        self.use_amp = training.amp and device.type == "cuda"

    def sync_buffers(self) -> None:
        """Gives every rank rank 0's buffers (BatchNorm statistics) before an evaluation."""
        if not self.context.enabled:
            return
        for buffer in [*self.model.buffers(), *self.heads.buffers()]:
            torch.distributed.broadcast(buffer, src=0)

    def _data_parallel(self, module: nn.Module) -> nn.Module:
        if not self.context.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    @property
    def num_blocks(self) -> int:
        """K in local mode, 1 in bp mode."""
        return len(self.optimizers)

    # training

    def train_step(
        self, images: torch.Tensor, targets: torch.Tensor, where: str, step: int
    ) -> StepResult:
        """One optimisation step on a batch.

        Args:
            images: ``(B, C, *S)`` on the learner's device.
            targets: ``(B,)`` class indices or values.
            where: ``"fold F, epoch E, step S"``, for the error message of a non-finite loss.
            step: Global step index (drives the penalty schedule).

        Raises:
            NonFiniteLossError: If a loss or a gradient norm is NaN or infinite (the step
                that met it is not applied).
        """
        self._set_training(True)
        if self.blocks is None:
            result = self._bp_step(images, targets, where, step)
        else:
            result = self._local_step(images, targets, where, step)
        if self.config.training.retract and self.blocks is None:
            retract_(self.model)
        return result

    def _bp_step(self, images, targets, where, step) -> StepResult:
        optimizer = self.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            task_loss = self.task_loss(self.train_model(images), targets)
        penalty = self._penalty(self.model, step)
        loss = task_loss + penalty
        _check_finite(loss, where)
        self._backward_and_step(loss, optimizer, self.model.parameters(), where)
        return StepResult(loss.item(), task_loss.item(), _value(penalty), [task_loss.item()])

    def _local_step(self, images, targets, where, step) -> StepResult:
        features = images
        block_losses, total, penalties = [], 0.0, 0.0
        for index in range(self.num_blocks):
            features, task_loss, penalty = self.local_block_step(
                index, features, targets, where, step
            )
            block_losses.append(task_loss)
            total += task_loss + penalty
            penalties += penalty
        return StepResult(total, block_losses[-1], penalties, block_losses)

    def local_block_step(
        self, index: int, block_input: torch.Tensor, targets: torch.Tensor, where: str, step: int
    ) -> tuple[torch.Tensor, float, float]:
        """One local update of block ``index`` on its (detached) input.

        Args:
            index: Which block.
            block_input: The previous block's output (or the images), ``(B, C, *S)``.
            targets: ``(B,)``.
            where: Location for the error message of a non-finite loss.
            step: Global step index (drives the penalty schedule).

        Returns:
            The block's output, detached (the next block's input), its task loss and its
            weighted penalty.

        Raises:
            NonFiniteLossError: If the block's loss or gradient norm is NaN or infinite (the
                block is not updated).
        """
        block, optimizer = self.blocks[index], self.optimizers[index]
        self._set_training(True)
        # a detached input: no gradient crosses the boundary, and the previous block's graph
        # is already freed by its own backward pass
        block_input = block_input.detach()
        optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            features, logits = self.train_blocks[index](block_input)
            task_loss = self.task_loss(logits, targets)
        penalty = self._penalty(block, step)
        loss = task_loss + penalty
        _check_finite(loss, f"{where}, block {index}")
        self._backward_and_step(loss, optimizer, block.parameters(), f"{where}, block {index}")
        # free this block's gradients now: kept until its next step, every block's would sit
        # in memory while the others train (0.86× bp peak memory instead of 0.49×,
        # benchmarks/memory_local_vs_bp.py)
        optimizer.zero_grad(set_to_none=True)
        if self.config.training.retract:
            retract_(block)
        return features.detach(), task_loss.item(), _value(penalty)

    def _backward_and_step(self, loss, optimizer, parameters, where: str) -> None:
        parameters = list(parameters)
        self.scaler.scale(loss).backward()
        clip = self.config.optim.grad_clip
        if clip is not None:
            self.scaler.unscale_(optimizer)
            norm = nn.utils.clip_grad_norm_(parameters, clip)
        elif not self.scaler.is_enabled():
            norm = _gradient_norm(parameters)
        if not self.scaler.is_enabled():
            # a finite loss can still have an overflowing gradient, which the step would
            # write into the weights (with fp16 the scaler skips such steps by itself)
            _check_finite(norm, where, "gradient norm")
        self.scaler.step(optimizer)
        self.scaler.update()

    def _penalty(self, module: nn.Module, step: int) -> torch.Tensor | float:
        training = self.config.training
        term = scheduled_penalty(module, step, training.ortho_weight, training.ortho_every)
        return 0.0 if term is None else term.to(self.device)

    def _autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _set_training(self, training: bool) -> None:
        self.model.train(training)
        self.heads.train(training)

    def end_epoch(self) -> None:
        """Advances every learning-rate schedule by one epoch."""
        for scheduler in self.schedulers:
            scheduler.step()

    @property
    def learning_rate(self) -> float:
        """Current learning rate (the same for every block)."""
        return self.optimizers[0].param_groups[0]["lr"]

    # losses and outputs

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Moves a batch to the learner's device (in the model's memory format)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (with label smoothing) on logits ``(B, K)``, or MSE on z-scored targets."""
        outputs = outputs.float()
        if self.task == "classification":
            smoothing = self.config.training.label_smoothing
            return F.cross_entropy(outputs, targets, label_smoothing=smoothing)
        scaled = (targets.float() - self.target_mean) / self.target_std
        return F.mse_loss(outputs.squeeze(1), scaled)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every head for a batch, last (the model's classifier) last.

        Returns:
            K tensors ``(B, num_outputs)`` in local mode, one in bp mode; regression outputs
            are in target units.
        """
        self._set_training(False)
        with self._autocast():
            if self.blocks is None:
                outputs = [self.model(images)]
            else:
                outputs, features = [], images
                for block in self.blocks:
                    features, logits = block(features)
                    outputs.append(logits)
        outputs = [o.float() for o in outputs]
        if self.task == "regression":
            outputs = [o * self.target_std + self.target_mean for o in outputs]
        return outputs

    # what to log and save

    def orthogonality_summary(self) -> dict[str, float]:
        """Largest and mean drift of the factors, and the spread of λ, over ENN layers."""
        drift = orthogonality_drift(self.model)
        if not drift:
            return {}
        values = [max(d.q, d.p) for d in drift.values()]
        spreads = []
        for module in self.model.modules():
            lam = getattr(module, "lam", None)
            if isinstance(lam, torch.Tensor):
                magnitude = lam.detach().abs().clamp_min(1e-12)
                spreads.append(float(magnitude.max() / magnitude.min()))
        return {
            "ortho/drift_max": max(values),
            "ortho/drift_mean": sum(values) / len(values),
            "lambda/log10_condition_mean": sum(math.log10(s) for s in spreads) / len(spreads),
        }

    def training_state(self) -> dict:
        """Model, heads, optimizers, schedulers and scaler, for the last checkpoint."""
        return {
            "model": self.model.state_dict(),
            "heads": self.heads.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }

    def _for_device(self, module: nn.Module) -> nn.Module:
        """``module`` in the memory format and normalisation this device and launch want."""
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.sync_batchnorm:
            # batch statistics over the global batch, as one process would compute them
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module

    def load_training_state(self, state: dict) -> None:
        """Restores what :meth:`training_state` saved."""
        self.load_weights(state)
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])

    def load_weights(self, state: dict) -> None:
        """Restores the model and heads (and target scaling) only: for the best checkpoint."""
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.target_mean = float(state["target_mean"])
        self.target_std = float(state["target_std"])


def _optimizer(module: nn.Module, config: Config) -> torch.optim.Optimizer:
    """The configured optimizer over ``module``; Q and P are not decayed (λ is)."""
    optim = config.optim
    groups = weight_decay_groups(module, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    optimizer_class = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=optim.lr)


def _scheduler(optimizer: torch.optim.Optimizer, config: Config):
    """Per-epoch schedule: linear warm-up, then cosine decay, constant, or steps."""
    optim, epochs = config.optim, config.training.epochs
    warmup = optim.warmup_epochs

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if optim.scheduler == "cosine":
            progress = (epoch - warmup) / max(1, epochs - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if optim.scheduler == "step":
            return optim.gamma ** ((epoch - warmup) // optim.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _value(term: torch.Tensor | float) -> float:
    return float(term.detach()) if isinstance(term, torch.Tensor) else float(term)


def _gradient_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _check_finite(value: torch.Tensor, where: str, what: str = "loss") -> None:
    if not torch.isfinite(value):
        raise NonFiniteLossError(
            f"non-finite {what} ({value.item()}) at {where}; the last good checkpoint is kept"
        )

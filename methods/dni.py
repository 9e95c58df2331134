"""Decoupled neural interfaces: synthetic gradients, bootstrapped from the stage below.

Scale convention: synthesizers' targets are gradients of the *summed* batch loss (B times
dL/dh of the mean loss, the units of the messages between stages); the group is stepped on
M(h)/B, the rule's estimate of dL/dh. The published fit (``synth_fit="l2"``) regresses on the
mean-loss gradient as it is; ``synth_fit="rms"`` (not published) on the targets divided by
their running RMS (``modules.Synthesizer``; see DESIGN.md, DNI).

A label-blind synthesizer can learn at most E[dL/dh | h]; on lc-vgg at lr 0.1 that part moves
faster than it can follow (``python -m bench.studies.dni_signal``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from . import modules
from .base import Stage, adam, main_optimizer, option, snapshot, take_grads

#: the synthesizers' optimizer: "adam" (its own Adam at ``synth_lr``: every published DNI);
#: "network" (not published): the groups' optimizer and rate (``net_optimizer``)
SYNTH_OPTIMIZERS = ("adam", "network")
#: how the groups step: "adam", every group on the rule's own Adam at ``net_lr`` without weight
#: decay (every published DNI that learns on CIFAR); "run", every group on the run's optimizer
#: and rate (``--optimizer``, ``--lr``, ...), as every other rule; "adam-synthetic" (lcbench's
#: choice, not published), the groups that step on synthetic gradients on the rule's Adam, the
#: last group, which steps on the true loss, on the run's optimizer as under BP, LC and the floor
NET_OPTIMIZERS = ("adam-synthetic", "adam", "run")
#: the rate lcbench chose for the LC tables, which state none (``bench.studies.dni_recipe``):
#: the DGL authors' published Adam rate (eugenium/DGL, ``dni_comparisons``)
CHOSEN_LR = 3e-5


@dataclass
class DNIOptions:
    """The synthesizer of the local-critic tables (Lee & Lee, ICLR 2019, section 3.1: "each
    additional module is composed of a convolutional layer and an output layer", the
    critic's: one 3x3 conv of 128 filters + ReLU), fitted with the published plain L2.

    How the groups step, the LC tables do not state (their DNI(3) has no recipe), so the default
    is lcbench's choice, by the measured study ``bench.studies.dni_recipe`` (docs/fidelity.md):
    ``net_optimizer="adam-synthetic"``, the groups that step on synthetic gradients with the
    rule's own Adam at ``net_lr = CHOSEN_LR`` (3e-5) without weight decay, as every published DNI
    that learns on CIFAR does (Jaderberg et al. 2017, appendix C; eugenium/DGL,
    ``dni_comparisons/cifar_cnn_dni.py``: one Adam for network and synthesizers, "doesnt
    converge for dni" on its SGD line), and the last group, on the true loss, with the run's
    optimizer, as BP, LC and the floor beside it in the table; the synthesizers with Adam at
    ``synth_lr = CHOSEN_LR``: both at the DGL authors' published 3e-5 (their one Adam for
    network and synthesizers). The published recipes stay reachable: ``net_optimizer="adam"``
    steps every group with the rule's Adam (at the default rates, the DGL authors' comparison;
    or ``net_optimizer="run"`` with ``--optimizer adam --lr 3e-5``); ``net_optimizer="run"`` with
    the run's SGD is the LC tables' network optimizer, under which the plain L2 fit diverges.
    The DGL authors' DNI comparison uses ``synth_layers=2, synth_kernel=5,
    synth_batchnorm=True`` (three 5x5 convs of 128, BN + ReLU between them).

    Not published, each an lcbench variant: ``synth_fit="sum"`` (the summed-loss gradient
    regressed, the output divided by B), ``synth_fit="rms"`` (targets divided by their running
    RMS), ``synth_optimizer="network"`` (the synthesizers stepped by the groups' own
    optimizer and rate), ``synth_factor`` (the synthetic gradient scaled
    before the group steps on it: koz4k/dni-pytorch, ``BackwardInterface.backward(factor=)``,
    whose default is 1)."""

    synth_layers: int = option(1, least=1)
    synth_kernel: int = option(3, least=1)
    synth_filters: int = option(128, least=1)
    synth_batchnorm: bool = False
    synth_fit: str = option("l2", choices=modules.SYNTH_FITS)
    synth_lr: float = option(CHOSEN_LR, above=0)
    net_optimizer: str = option("adam-synthetic", choices=NET_OPTIMIZERS)
    net_lr: float = option(CHOSEN_LR, above=0)
    synth_optimizer: str = option("adam", choices=SYNTH_OPTIMIZERS)
    synth_factor: float = option(1.0, above=0)

    #: options whose non-default values are lcbench's variants, not the published rule
    VARIANT_OPTIONS = ("synth_fit", "synth_optimizer", "synth_factor")

    @staticmethod
    def chosen(options: dict) -> str:
        """What of ``options`` is lcbench's choice rather than a published recipe: the rule's
        own Adam, its rate, and, by default, the last group on the run's optimizer."""
        net = options.get("net_optimizer", "adam-synthetic")
        if net == "run":
            return ""
        rate = f"Adam {options.get('net_lr', CHOSEN_LR):g}"
        below = " below the last group" if net == "adam-synthetic" else ""
        return f"{rate}{below}: lcbench's choice"

    def __post_init__(self):
        if self.synth_kernel % 2 == 0:
            raise ValueError(
                f"option synth_kernel of dni must be odd: a conv of even size does "
                f"not preserve the resolution (got {self.synth_kernel})"
            )


class DNIStage(Stage):
    """f_k steps on h_k.backward(M_k(h_k)) at once; M_k regresses (L2) on the target
    J_{k+1}^T M_{k+1}(h_{k+1}) (the true gradient for the last synthesizer), from the same
    forward pass, kept until the target comes."""

    version = 5  # 5: Adam 3e-5; 4: the last group on the run's optimizer; 3: every group on Adam
    upstream = "gradient"
    predicts = "gradient"
    conditioned = False

    def __init__(
        self, index, count, group, criterion, train, *, shape, classes, options: DNIOptions
    ):
        super().__init__(index, count, group, criterion, train)
        own = options.net_optimizer == "adam" or (
            options.net_optimizer == "adam-synthetic" and not self.last
        )
        self.net_lr = options.net_lr if own else None
        if self.net_lr is not None:
            self.optimizer = adam(group.parameters(), self.net_lr, train)
        self.synth = None
        if not self.last:
            self.synth = modules.Synthesizer(
                shape,
                classes,
                conditioned=self.conditioned,
                filters=options.synth_filters,
                kernel=options.synth_kernel,
                layers=options.synth_layers,
                batchnorm=options.synth_batchnorm,
                fit=options.synth_fit,
            )
            parameters = self.synth.parameters()
            if options.synth_optimizer == "adam":
                self.synth_optimizer = adam(parameters, options.synth_lr, train)
            elif self.net_lr is not None:  # the groups' own Adam, as one optimizer would be
                self.synth_optimizer = adam(parameters, self.net_lr, train)
            else:
                self.synth_optimizer = main_optimizer(parameters, train)
        self.factor = options.synth_factor
        self.synth_follows_schedule = options.synth_optimizer == "network"

    def _label(self, y):
        return y if self.conditioned else None

    @torch.no_grad()
    def synthetic_gradient(self, h, y):
        """The rule's estimate of dL/dh of the mean batch loss (what the group steps on)."""
        return self.synth.gradient(h, self._label(y)) * (self.factor / y.shape[0])

    def local_gradient(self, h, y):
        return None if self.last else self.synthetic_gradient(h.detach(), y)

    def forward(self, batch, x, y):
        n = y.shape[0]
        keep_input = self.index > 0
        if self.last:
            _, grad = self.true_loss(batch, x, y, keep_input=keep_input)
            return None, (grad * n if keep_input else None)
        x = x.requires_grad_() if keep_input else x
        with self.phase("forward"):
            h = self.group(x)
            weights = snapshot(self.synth)  # the pass is kept for the synthesizer's update
            output = functional_call(self.synth, weights, (h.detach(), self._label(y)))
        self.backward(h, self.synth.to_gradient(output.detach()) * (self.factor / n))
        self.step(self.optimizer)
        self.kept[batch] = (output, weights)
        return h.detach(), (x.grad * n if keep_input else None)

    def receive(self, batch, message):
        output, weights = self.kept.pop(batch)
        loss = self.synth.fit_loss(output, message)
        self.backward(loss, inputs=list(weights.values()))
        take_grads(self.synth, weights)
        self.step(self.synth_optimizer)
        self.tally(output.shape[0], synth_loss=loss)

    def scale_lr(self, factor: float) -> None:
        """The schedule's ``factor`` on the groups' rate (the rule's own ``net_lr``, or the
        run's) and, with ``synth_optimizer="network"``, on the synthesizers' (the same)."""
        super().scale_lr(factor)
        base = self.net_lr if self.net_lr is not None else self.train_options.lr
        followers = [self.optimizer] if self.net_lr is not None else []
        if self.synth is not None and self.synth_follows_schedule:
            followers.append(self.synth_optimizer)
        for optimizer in followers:
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    def modules(self):
        return [self.group] + ([self.synth] if self.synth is not None else [])

    def optimizers(self):
        return [self.optimizer] + ([self.synth_optimizer] if self.synth is not None else [])


class CDNIStage(DNIStage):
    """cDNI: the synthesizer also sees the one-hot label."""

    conditioned = True

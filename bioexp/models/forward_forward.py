"""Forward-Forward learning (Hinton 2022, "The Forward-Forward algorithm: some preliminary
investigations", arXiv:2212.13345), the supervised variant: `ff_mlp`.

No error travels backwards between layers. The label is written into the image (a one-hot
overwriting its first `num_classes` pixels); each layer sees the length-normalised activity of
the layer below and is trained by a loss of its own to give a high goodness to positive data
(the image with its true label) and a low one to negative data (the same image with a wrong
label). The network classifies by running once per label and picking the label with the largest
total goodness. Equations, for one layer l with input h_{l-1} (the flattened, labelled image
for l = 1):

    n_{l-1} = h_{l-1} / rms(h_{l-1}),   rms(v) = sqrt(mean_k v_k^2 + 1e-8)
    h_l     = relu(W_l n_{l-1} + b_l)
    g_l     = mean_j h_{l,j}^2                        (goodness: the mean, not the sum, of the
                                                       squared activities, so that one threshold
                                                       fits every width)
    L_l     = 1/2 [softplus(theta - g_l(pos)) + softplus(g_l(neg) - theta)], batch means

so that the probability that the data are positive is sigmoid(g_l - theta). The paper uses the
summed goodness G_l = sum_j h_{l,j}^2 = N g_l (N the layer's width), and sigmoid(g_l - theta)
= sigmoid((G_l - N theta) / N): the paper's probability with a threshold N times larger, read
through a sigmoid N times shallower. That is no mere rescaling: the loss's slope in G_l, and so
every gradient, is 1/N of the paper's, and reaching the paper's form would take weights sqrt(N)
times larger and a sigmoid N times steeper. The mean is kept so that one threshold serves every
width. Normalising by the root mean square (the length over sqrt(width)) rather than by the
length multiplies what every layer reads by sqrt(width below), a constant: the direction of the
activity vector passes on and its length (the goodness) does not, as in the paper, but the
effective scale of W_l, and so its learning rate, differs from the paper's. The first layer's
input, the labelled image, is normalised the same way.

Training (`train_step`): the positive and the negative copy of each image go up the network as
one batch; every layer's input is detached, so L_l reaches W_l and b_l only, and one optimiser
step on sum_l L_l over all layers' parameters updates each layer by its own loss alone. For
per-parameter optimisers (SGD, Adam, RMSprop; weight decay too) this is exactly one optimiser
per layer with the same settings; only `schedule.supervised.grad_clip`, which clips the norm of
all layers' gradients together, couples the layers. Negative labels are uniformly random wrong
labels (`negatives: random`) or hard negatives (`negatives: hard`): as Hinton suggests, a wrong
label drawn with probability proportional to the model's own softmax over the total goodness of
each label, the true label left out. Hard negatives cost one extra forward pass per label and
batch (no backward). The labelled copies of an image differ only in their label pixels, whose
sum of squares is the same for every label, so the first layer computes W x once per image and
adds each label's column of W (`FFNet.first_layer`, exact): a pass per label costs little more
than the layers above the first.

Prediction (`forward`): the scores of an image are its total goodness under each label, sum_l
g_l over every layer, or over every layer but the first with `skip_first: true` (Hinton's
choice; a network of one layer always counts its layer), and `predict` is the argmax. The body
computes the per-label, per-layer goodness table (B, classes, layers), the head sums it;
`forward` is differentiable in the image, so FGSM (`bioexp eval`) attacks it. `loss(scores, y)`
(what validation and test report, and what FGSM ascends) is the cross-entropy of the goodness
scores read as logits (temperature 1), which is small when the true label's total goodness
stands clearly above the others; the training loss `train_loss` is sum_l L_l instead. The
training accuracy is reported only with hard negatives, whose scores come for free; with random
ones `train_acc` is n/a (it would cost a pass per label).

Departures from the paper: mean rather than summed goodness and rms rather than length
normalisation (both change the scale of the loss and of the weights' gradients, above); a label
written with value `label_value` = 10 rather than the one-hot 1 of the paper and of the public
reimplementations (loeweX/Forward-Forward), so that the label is not drowned by 784 pixels in
the normalised input (picked on validation: docs/tuning.md); and none of the paper's extras
(peer normalisation, the learning-rate schedule of its MATLAB code, a softmax read-out on the
hidden activities). The paper's network
is 4 layers of 2000 ReLUs (`model.hidden=[2000,2000,2000,2000] model.skip_first=true`, for a
GPU). The CPU default, picked on a validation split of Fashion-MNIST, is one layer of 1000 with
hard negatives, counted in prediction: there, layers above the first classified worse than the
first (with [500, 500]: 0.888 from layer 1 alone, 0.839 from layer 2, 0.882 from both), so
depth cost time without gaining accuracy.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.errors import ConfigError
from bioexp.models.base import Classifier, Layers, Positive
from bioexp.registry import Range, register_model

Negatives = Literal["random", "hard"]
Threshold = Annotated[float, Range(low=0)]
EPS = 1e-8  # in the root mean square, so that an all-zero activity stays finite


def embed_labels(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 value: float = 1.0) -> torch.Tensor:
    """Flattened images whose first `num_classes` pixels are replaced by `value` * one-hot(label);
    a new tensor, differentiable in the other pixels of `x`."""
    x = x.flatten(1)
    onehot = F.one_hot(labels, num_classes).to(x.dtype) * value
    return torch.cat([onehot, x[:, num_classes:]], dim=1)


def rms_normalise(h: torch.Tensor) -> torch.Tensor:
    """h / sqrt(mean(h^2) + 1e-8), row by row: the direction of the activity, not its length."""
    return h / h.square().mean(dim=1, keepdim=True).add(EPS).sqrt()


def goodness(h: torch.Tensor) -> torch.Tensor:
    """mean_j h_j^2 per row."""
    return h.square().mean(dim=1)


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float) -> torch.Tensor:
    """1/2 [mean softplus(theta - g_pos) + mean softplus(g_neg - theta)]: minus the mean
    log-probability of the right verdict when p(positive) = sigmoid(g - theta)."""
    return 0.5 * (F.softplus(threshold - g_pos).mean() + F.softplus(g_neg - threshold).mean())


class FFLayer(nn.Module):
    """relu(W rms_normalise(h) + b); the weights start as nn.Linear's do. (Not an nn.Linear, so
    that `bioexp eval`'s embedding reads the goodness table, one row per image.)"""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(rms_normalise(h), self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class FFNet(nn.Module):
    """The stack of FF layers over labelled images; `forward(x)` is the goodness table
    (B, classes, layers): the goodness of every layer with each label written in."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int,
                 label_value: float):
        super().__init__()
        sizes = [in_features, *hidden]
        self.layers = nn.ModuleList(FFLayer(a, b) for a, b in zip(sizes[:-1], sizes[1:],
                                                                  strict=True))
        self.num_classes, self.label_value = num_classes, label_value

    def first_layer(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The first layer's activity (K, B, width) for K labellings `labels` (K, B) of the
        images `x` (B, ...): exactly `layers[0](embed_labels(x, labels[k]))`, computed with one
        product for the image part. The label pixels have the same sum of squares (value^2)
        whatever the label, so rms(input) depends on the image alone and a label only adds
        value * (its column of W) before the division."""
        layer, classes = self.layers[0], self.num_classes
        image = x.flatten(1)[:, classes:]
        square_sum = image.square().sum(dim=1) + self.label_value ** 2
        rms = (square_sum / x[0].numel() + EPS).sqrt()
        drive = F.linear(image, layer.weight[:, classes:])  # (B, width)
        label_drive = self.label_value * layer.weight[:, :classes].T[labels]  # (K, B, width)
        return F.relu((drive + label_drive) / rms[:, None] + layer.bias)

    def goodnesses(self, x: torch.Tensor, labels: torch.Tensor,
                   detach: bool = False) -> list[torch.Tensor]:
        """Each layer's goodness (K, B) for K labellings `labels` (K, B) of the images `x`
        (B, ...); `detach` cuts the graph between layers (training), leaving each goodness a
        function of its own layer's parameters alone."""
        h = self.first_layer(x, labels)
        out = [goodness(h.flatten(0, 1)).view(labels.shape)]
        h = h.flatten(0, 1)
        for layer in self.layers[1:]:
            h = layer(h.detach() if detach else h)
            out.append(goodness(h).view(labels.shape))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(self.num_classes, device=x.device)[:, None].expand(-1, len(x))
        table = torch.stack(self.goodnesses(x, labels), dim=-1)  # (classes, B, layers)
        return table.transpose(0, 1)  # (B, classes, layers)


class GoodnessSum(nn.Module):
    """Scores (B, classes): the goodness table summed over the layers counted in prediction
    (all but the first when `skip_first` and there are several)."""

    def __init__(self, skip_first: bool):
        super().__init__()
        self.skip_first = skip_first

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        first = 1 if self.skip_first and table.shape[-1] > 1 else 0
        return table[..., first:].sum(dim=-1)


class ForwardForward(Classifier):
    """A Classifier whose body is an `FFNet` and whose training step is Forward-Forward's."""

    def __init__(self, net: FFNet, threshold: float, negatives: str, skip_first: bool):
        super().__init__(head=GoodnessSum(skip_first), body=net)
        self.threshold, self.negatives = threshold, negatives

    def negative_labels(self, x: torch.Tensor, y: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Wrong labels for the negative data, and (hard negatives only) the batch's scores."""
        classes = self.body.num_classes
        if self.negatives == "random":
            shift = torch.randint(1, classes, y.shape, device=y.device)
            return (y + shift) % classes, None
        with torch.no_grad():
            scores = self(x)
            weights = torch.softmax(scores, dim=1).scatter(1, y[:, None], 0.0)
            # an image whose wrong labels all underflowed to 0: any wrong label, equally
            weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights,
                                  torch.ones_like(weights).scatter(1, y[:, None], 0.0))
            return torch.multinomial(weights, 1).squeeze(1), scores

    def layer_losses(self, x: torch.Tensor, y: torch.Tensor, y_neg: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's loss L_l, and the goodness of the positive and the negative data per
        layer (batch means); each loss depends on its own layer's parameters only."""
        both = self.body.goodnesses(x, torch.stack([y, y_neg]), detach=True)
        losses = [ff_loss(g[0], g[1], self.threshold) for g in both]
        return (losses, [g[0].detach().mean() for g in both], [g[1].detach().mean() for g in both])

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_l L_l on the batch, with negative labels drawn as `train_step` draws them."""
        y_neg, _ = self.negative_labels(x, y)
        return torch.stack(self.layer_losses(x, y, y_neg)[0]).sum()

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """Negative labels, every layer's local loss, one optimiser step on their sum (which,
        the layers' inputs being detached, is one step per layer on its own loss); `loss` is
        that sum, `training_loss`."""
        y_neg, scores = self.negative_labels(x, y)
        losses, g_pos, g_neg = self.layer_losses(x, y, y_neg)
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics = {"loss": loss.detach(), "pos_goodness": torch.stack(g_pos).mean(),
                   "neg_goodness": torch.stack(g_neg).mean()}
        if scores is not None:
            metrics["correct"] = (self.predict(scores) == y).sum()
        return metrics


@register_model
def ff_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Layers = (1000,),
           threshold: Threshold = 2.0, negatives: Negatives = "hard",
           skip_first: bool = False, label_value: Positive = 10.0) -> Classifier:
    """Forward-Forward MLP (Hinton 2022): label in the image, a goodness loss per layer.

    Every layer learns alone to make its goodness (mean squared ReLU activity) exceed
    `threshold` on images with their true label and stay below it with a wrong one; prediction
    is the label whose copy of the image gets the largest total goodness. See the module
    docstring for the equations and the departures from the paper.
    """
    in_features = math.prod(input_shape)
    if in_features <= num_classes:
        raise ConfigError(f"ff_mlp writes the label over the first {num_classes} pixels, and an "
                          f"image of {in_features} has no pixel left")
    net = FFNet(in_features, tuple(hidden), num_classes, label_value)
    return ForwardForward(net, threshold, negatives, skip_first)

"""One-line tooltips and option labels for the configuration widgets."""

from __future__ import annotations

ORDER_LABELS = {
    "post": "(a) original: add, then ReLU",
    "bn_after_add": "(b) BN after addition",
    "relu_before_add": "(c) ReLU before addition",
    "relu_only_pre": "(d) ReLU-only pre-activation",
    "pre": "(e) full pre-activation",
}
SHORTCUT_LABELS = {
    "A": "A: zero-pad the new channels",
    "B": "B: project only when the shape changes",
    "C": "C: always project",
}
SCALING_LABELS = {"none": "none", "fixed": "fixed", "learnable": "learnable"}

HELP = {
    "style": "CIFAR nets have 3 stages and a 3x3 stem (6n+2 layers); ImageNet nets have 4 stages and a strided 7x7 stem.",
    "kind": "Basic blocks stack two 3x3 convs; bottlenecks squeeze with 1x1, convolve 3x3, expand 4x with 1x1.",
    "order": "Where norm and activation sit relative to the addition (He et al. 2016b, Table 2); "
             "(e) keeps the shortcut a clean identity path.",
    "norm": "Normalisation inside each block: batch statistics, per-sample channel groups, or none.",
    "groups": "Channel groups of GroupNorm (reduced to a divisor of the channel count when needed).",
    "act": "The non-linearity used everywhere in the net.",
    "shortcut": "What S(x) does when a block changes width or resolution (He et al. 2016): A pads the new channels "
                "with zeros (no parameters); B projects with a 1x1 conv only where the shape changes; C always projects.",
    "scaling": "Multiply the residual branch F(x) by alpha; "
               "a learnable alpha starting at 0 makes every block start as the identity (ReZero, SkipInit).",
    "alpha": "Fixed multiplier of F(x); small values keep deep nets close to the identity at initialisation.",
    "alpha_init": "Starting value of the learnable alpha (0 is ReZero/SkipInit).",
    "zero_init_last": "Zero the last norm's scale in F, so each block starts as y = S(x) (Goyal et al. 2017).",
    "stochastic_depth": "Probability of dropping the last block's branch during training; "
                         "earlier blocks drop linearly less (Huang et al. 2016).",
    "depth": "Number of weighted layers, as in the names ResNet-20/56/110; deeper plain nets get harder to train.",
    "width": "Channels of the first stage; every later stage doubles them.",
    "input_size": "Side of the square input image in pixels; must be a multiple of the net's total stride.",
    "num_classes": "Outputs of the final linear layer (the Train page sets it from the dataset).",
    "in_channels": "Colour channels of the input (the Train page sets it from the dataset).",
    "skips_off": "Blocks whose skip connection is removed, turning them into plain blocks y = post(F(x)).",
    "dataset": "Built-in datasets need no download; torchvision datasets appear when their files are on disk.",
    "folder": "A folder with one sub-folder of images per class, on the machine running the app.",
    "optimizer": "SGD with Nesterov momentum 0.9, or AdamW.",
    "lr": "Peak learning rate of the one-cycle schedule (warm-up, then cosine decay to 0).",
    "epochs": "Passes over the training set; fractions are allowed.",
    "batch_size": "Images per optimisation step.",
    "train_size": "How many training images to load; the test split is a fifth of it (at least 200).",
    "seed": "Seeds weights, batch order and augmentation, so a run can be repeated exactly.",
    "device": "Where training runs; 'auto' picks a GPU when there is one.",
    "twin": "Train the same net with every skip connection off, on the same batches from the same initial weights.",
}

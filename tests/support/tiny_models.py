"""Small stand-in networks for the training tests (built from resfast.nn layers,
torchvision layout), addressed as ``--model tiny_models:<fn>``."""
import torch
from torch import nn

from resfast import nn as rnn


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet: conv-BN-ReLU stem, stages of BasicBlocks with option A
    shortcuts, global average pool, FC."""

    def __init__(self, num_classes=10, widths=(8, 16), blocks=1):
        super().__init__()
        self.stem = rnn.Conv2dBNReLU(3, widths[0], 3)
        layers, inp = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(rnn.BasicBlock(inp, w, stride, shortcut="A"))
                inp = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inp, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnet(num_classes=10):
    return TinyResNet(num_classes)


def resnet20(num_classes=10):
    """The CIFAR ResNet-20 of the paper (16-32-64, n=3, option A)."""
    return TinyResNet(num_classes, widths=(16, 32, 64), blocks=3)


class TinyVGG(nn.Module):
    """torchvision's VGG layout (features / avgpool / classifier of 3 Linear layers)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            rnn.Conv2dBNReLU(3, 8, 3), nn.MaxPool2d(2),
            rnn.Conv2dBNReLU(8, 16, 3), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 2 * 2, 32), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def tiny_vgg(num_classes=10):
    return TinyVGG(num_classes)


class TinyPlain(nn.Module):
    """The plain counterpart of TinyResNet (no shortcuts)."""

    def __init__(self, num_classes=10, widths=(8, 16)):
        super().__init__()
        layers, inp = [rnn.Conv2dBNReLU(3, widths[0], 3)], widths[0]
        for i, w in enumerate(widths):
            layers += [rnn.Conv2dBNReLU(inp, w, 3, stride=2 if i > 0 else 1),
                       rnn.Conv2dBNReLU(w, w, 3)]
            inp = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(inp, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def tiny_plain(num_classes=10):
    return TinyPlain(num_classes)

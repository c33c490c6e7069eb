"""torch.hub entry points: one per registered net (resnet18, resnet20, ..., plain56, ...).

    model = torch.hub.load("path/to/this/repo", "resnet56", source="local", pretrained=True)
    model.predict(uint8_images)  # class indices; model.classes names them

pretrained=False builds the untrained net (keyword arguments go to resnet.build_model: num_classes, width,
...). pretrained=True loads the weights shipped in weights/ (no network) where there are some, else refuses.
"""

import os

from resnet import MODEL_NAMES, ResNet, build_model

dependencies = ["torch"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# name -> shipped weights file (weights/README.md: the runs they come from, their test accuracy, sha256)
PRETRAINED = {"resnet18": "resnet18-jpeg50ep.pt", "resnet20": "resnet20-jpeg15ep.pt",
              "resnet56": "resnet56-jpeg15ep.pt"}


def _entry_point(name: str):
    def load(pretrained: bool = False, **kwargs) -> ResNet:
        if not pretrained:
            return build_model(name, **kwargs)
        if name not in PRETRAINED:
            have = ", ".join(sorted(PRETRAINED))
            raise ValueError(f"no trained weights ship for {name}; pretrained=True is available for: {have}")
        if kwargs:
            raise ValueError(f"pretrained=True loads the shipped {name} as trained; it takes no "
                             f"{', '.join(kwargs)}")
        from runs import load_model  # imported on use: hub's listing of entry points stays light

        return load_model(os.path.join(WEIGHTS_DIR, PRETRAINED[name]))

    load.__name__ = load.__qualname__ = name
    trained = f"; pretrained=True: the shipped weights ({PRETRAINED[name]})" if name in PRETRAINED else ""
    load.__doc__ = f"{name} (resnet.build_model's kwargs){trained}."
    return load


for _name in MODEL_NAMES:
    globals()[_name] = _entry_point(_name)

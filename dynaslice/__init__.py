"""dynaslice: dynamic weight slicing (DS-Net, DS-Net++) and resource-adaptive supernets (PSS-Net).

import dynaslice as ds
net = ds.create_supernet("resnet50", num_classes=1000)
arch = net.space.uniform(0.5)
y = net(x, arch)                        # the subnet, computed with dense weight slices
small = ds.extract_subnet(net, arch)    # a plain torch.nn model with the same outputs
ds.count_macs(net, arch)                # exact, analytic
net = ds.make_supernet(my_model, torch.randn(1, 3, 224, 224))   # your own network as a supernet

gated = ds.GatedSupernet(net, routes=4)   # DS-Net's gate; ds.DynamicNet(gated) runs it per input
budget = ds.BudgetNet.load("runs/pss")    # PSS-Net: budget(x, max_macs=12e6) switches subnets
"""

from .budget import BudgetNet, BudgetTable
from .counting import count_macs, count_params
from .dynamic import DynamicNet
from .gate import GatedSupernet
from .modelfile import load_supernet
from .models import (
    ConvertedSupernet,
    Supernet,
    create_supernet,
    list_supernets,
    load_pretrained,
    make_supernet,
    register_supernet,
)
from .space import Arch, Dim, SearchSpace, make_divisible, width_grid
from .torch_export import extract_subnet
from .version import __version__ as __version__

__all__ = [
    "Arch",
    "BudgetNet",
    "BudgetTable",
    "ConvertedSupernet",
    "DynamicNet",
    "GatedSupernet",
    "Dim",
    "SearchSpace",
    "Supernet",
    "count_macs",
    "count_params",
    "create_supernet",
    "extract_subnet",
    "list_supernets",
    "load_pretrained",
    "load_supernet",
    "make_divisible",
    "make_supernet",
    "register_supernet",
    "width_grid",
]

"""dynaslice: dynamic weight slicing (DS-Net, DS-Net++) and resource-adaptive supernets (PSS-Net).

import dynaslice as ds
net = ds.create_supernet("resnet50", num_classes=1000)
arch = net.space.uniform(0.5)
y = net(x, arch)                        # the subnet, computed with dense weight slices
small = ds.extract_subnet(net, arch)    # a plain torch.nn model with the same outputs
ds.count_macs(net, arch)                # exact, analytic
"""

from .export import extract_subnet
from .models import Supernet, create_supernet, list_supernets, load_pretrained, register_supernet
from .profile import count_macs, count_params
from .space import Arch, Dim, SearchSpace, make_divisible, width_grid

__version__ = "0.1.0"

__all__ = [
    "Arch",
    "Dim",
    "SearchSpace",
    "Supernet",
    "count_macs",
    "count_params",
    "create_supernet",
    "extract_subnet",
    "list_supernets",
    "load_pretrained",
    "make_divisible",
    "register_supernet",
    "width_grid",
]

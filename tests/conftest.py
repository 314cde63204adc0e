import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every test model is tiny: a second intra-op thread only adds overhead (and spins on a busy machine).
torch.set_num_threads(1)

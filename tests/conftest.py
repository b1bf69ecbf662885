import os
import sys

# Let the tests import their ground-truth helpers as `tests.ground_truth`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

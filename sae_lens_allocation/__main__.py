import sys

from sae_lens_allocation.cli import main

sys.exit(main())

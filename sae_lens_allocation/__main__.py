import sys

from sae_lens_allocation_cli import main

sys.exit(main())

"""Writers of tiny copies of every dataset layout metashot reads, in the exact file formats."""

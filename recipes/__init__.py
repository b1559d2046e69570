"""Named recipes (`pkdq recipes`): one YAML file each, shipped with the package."""

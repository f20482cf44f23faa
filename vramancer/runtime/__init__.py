"""Running a split model: the split itself, hand-overs, migration, rebalancing, recovery, graphs."""

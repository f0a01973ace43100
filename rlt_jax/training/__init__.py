"""The steps and the loops: config → objects, train and evaluation steps, the runs."""

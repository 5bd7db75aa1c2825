# rh's pytest plugin is installed with the package (entry point pytest11: rh.pytest_plugin).

pytest_plugins = ["tests.components.fixtures", "tests.filterhost_fixtures"]

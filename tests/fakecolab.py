"""Small fakes of the notebook platforms' modules, for the code paths that only run inside them.

`google.colab` (drive, userdata, output) follows googlecolab/colabtools: `drive.mount(mountpoint,
force_remount=False, timeout_ms=120000, readonly=False)` makes `MOUNTPOINT/MyDrive` appear;
`userdata.get(key)` returns a secret or raises `NotebookAccessError` (the notebook may not read it)
or `SecretNotFoundError` (a subclass of `google.colab.errors.Error`); `output.enable_custom_widget_manager()`
lets Colab's frontend render ipywidgets 8. `kaggle_secrets.UserSecretsClient().get_secret(label)` is
Kaggle's. These are stand-ins: the real modules exist only on those platforms.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types


@contextlib.contextmanager
def colab(secrets: dict | None = None, denied: tuple = ()):
    """Install a fake google.colab; yield a record of what was called."""
    calls: dict[str, list] = {"mount": [], "widget_manager": [], "secret": []}
    google = types.ModuleType("google")
    google.__path__ = []
    pkg = types.ModuleType("google.colab")
    pkg.__path__ = []
    errors = types.ModuleType("google.colab.errors")

    class Error(Exception):
        pass

    errors.Error = Error
    drive = types.ModuleType("google.colab.drive")

    def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
        calls["mount"].append(mountpoint)
        os.makedirs(os.path.join(mountpoint, "MyDrive"), exist_ok=True)

    drive.mount = mount
    userdata = types.ModuleType("google.colab.userdata")

    class NotebookAccessError(Exception):
        def __init__(self, key):
            super().__init__(f"Notebook does not have access to secret {key}")

    class SecretNotFoundError(Error):
        def __init__(self, key):
            super().__init__(f"Secret {key} does not exist.")

    def get(key):
        calls["secret"].append(key)
        if key in denied:
            raise NotebookAccessError(key)
        if key not in (secrets or {}):
            raise SecretNotFoundError(key)
        return secrets[key]

    userdata.get, userdata.NotebookAccessError, userdata.SecretNotFoundError = get, NotebookAccessError, \
        SecretNotFoundError
    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = lambda: calls["widget_manager"].append(True)
    pkg.drive, pkg.userdata, pkg.output, pkg.errors = drive, userdata, output, errors
    google.colab = pkg
    modules = {"google": google, "google.colab": pkg, "google.colab.drive": drive, "google.colab.userdata": userdata,
               "google.colab.output": output, "google.colab.errors": errors}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield calls
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@contextlib.contextmanager
def kaggle(secrets: dict):
    """Install a fake kaggle_secrets; the caller sets KAGGLE_KERNEL_RUN_TYPE as Kaggle's kernels have it."""
    module = types.ModuleType("kaggle_secrets")

    class UserSecretsClient:
        def get_secret(self, label):
            if label not in secrets:
                raise ValueError(f"Unexpected response from the service: no secret {label}")
            return secrets[label]

    module.UserSecretsClient = UserSecretsClient
    saved = sys.modules.get("kaggle_secrets")
    sys.modules["kaggle_secrets"] = module
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("kaggle_secrets", None)
        else:
            sys.modules["kaggle_secrets"] = saved

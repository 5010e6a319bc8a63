"""The local image measures what the interpreter runs at start-up, not only the locked distributions."""

import site

import pytest

from ansible_collections.confidential_ml.nitro.enclave_local import image
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import ImageError


@pytest.mark.slow
def test_a_pth_file_added_to_site_packages_changes_the_measurement_and_is_refused(tmp_path, monkeypatch):
    """A .pth in a site directory runs in every job (python -I still reads them) but is in no RECORD."""
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(site_dir)])
    clean = image.Image.load(image.build(tmp_path / "clean.eif").image)
    clean.check_host()

    (site_dir / "zz-hook.pth").write_text("import os; os.environ['HOOKED'] = '1'\n")
    hooked = image.Image.load(image.build(tmp_path / "hooked.eif").image)
    assert {"file": "zz-hook.pth", "sha256": hooked.runtime["site_hooks"][-1]["sha256"]} in hooked.runtime["site_hooks"]
    assert hooked.measurements.pcr2 == clean.measurements.pcr2  # the same code...
    assert hooked.measurements.pcr1 != clean.measurements.pcr1  # ...on another start-up
    assert hooked.measurements.pcr0 != clean.measurements.pcr0
    with pytest.raises(ImageError, match=r"start-up hooks differ \(zz-hook\.pth\)"):
        clean.check_host()
    hooked.check_host()
    (site_dir / "zz-hook.pth").write_text("import os; os.environ['HOOKED'] = '2'\n")  # edited in place
    with pytest.raises(ImageError, match=r"start-up hooks differ \(zz-hook\.pth\)"):
        hooked.check_host()

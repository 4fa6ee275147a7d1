"""`bcc-desk [FOLDER]`: start the desktop app, optionally classifying FOLDER at once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import QCoreApplication, QSettings, QTimer
from PySide6.QtWidgets import QApplication

from bcc_desk import __version__
from bcc_desk.gui.syslibs import EXIT_MISSING_LIBRARIES, check_xcb
from bcc_desk.logs import quiet_developer_noise
from bcc_desk.paths import APP_NAME


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bcc-desk", description="Review B-ALL blood smear images and export the report.")
    parser.add_argument("folder", nargs="?", type=Path, help="slide folder to classify at once")
    parser.add_argument("--model", "-m", action="append", type=Path, default=None,
                        help="model bundle folder (repeat for an ensemble); default: the last one used")
    parser.add_argument("--settings", type=Path, default=None,
                        help="keep the settings in this INI file instead of the user's (demos, kiosks)")
    parser.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                        help="classify FOLDER, show the least confident image with Grad-CAM, save the "
                        "window as PNG and quit (how the README's picture is made)")
    parser.add_argument("--version", action="version", version=f"bcc-desk {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.folder is not None and not args.folder.exists():
        print(f"bcc-desk: error: {args.folder} does not exist", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_developer_noise()
    app = QApplication.instance()
    if app is None:
        # Qt's xcb plugin aborts the process (no traceback, a misleading hint) when a system
        # library is missing: say which, and how to install them, instead.
        problem = check_xcb()
        if problem is not None:
            print(problem, file=sys.stderr)
            return EXIT_MISSING_LIBRARIES
        app = QApplication([sys.argv[0] if sys.argv else APP_NAME])
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(APP_NAME)
    app.setApplicationVersion(__version__)

    # Imported after QApplication exists: building widgets needs it.
    from bcc_desk.gui.main_window import MainWindow

    settings = QSettings(str(args.settings), QSettings.Format.IniFormat) if args.settings else None
    window = MainWindow(model_dirs=args.model, settings=settings, ask_before_close=args.screenshot is None)
    if args.screenshot is not None:
        if args.folder is None:
            print("bcc-desk: error: --screenshot needs a FOLDER", file=sys.stderr)
            return 2
        window.resize(1440, 900)
        _screenshot_when_done(window, args.screenshot, app)
    window.show()
    if args.folder is not None:
        QTimer.singleShot(0, lambda: window.open_folder(args.folder))
    return app.exec()


def _screenshot_when_done(window, out: Path, app: QCoreApplication) -> None:
    """After the run: flagged first, the top image with its Grad-CAM map, then save and quit."""

    saved: list[bool] = []

    def save() -> None:
        if saved:
            return
        saved.append(True)
        window.grab().save(str(out))
        print(f"screenshot: {out}")
        window.close()
        app.quit()

    def finished(_completed: bool) -> None:
        window.flagged_first()
        pane = window.image_pane
        shown = pane.prediction
        if shown is None or shown.error is not None:  # nothing to explain
            QTimer.singleShot(1000, save)
            return
        pane.cam_shown.connect(lambda: QTimer.singleShot(300, save))
        pane.cam_failed.connect(lambda _msg: QTimer.singleShot(300, save))
        pane.cam_toggle.setChecked(True)
        QTimer.singleShot(120_000, save)  # never hang a script on a map that does not come

    window.classification_finished.connect(finished)


if __name__ == "__main__":
    sys.exit(main())

"""The desktop GUI (``python vital_gui.py``): pick a mode, a model and a target, press Run and
watch the image form.

The window builds the mode's CFG (the dataclass the scripts parse) and runs the same run
function as the script, in a worker thread (``vital.app.forms.RunWorker``); the thread reports
through a queue that the window drains every ``POLL_MS`` with ``after``. Only the basic settings
are shown; every other field keeps its default, and "Save config" writes the run's CFG as the
JSON the script reads with ``--json_cfg``.
"""
from __future__ import annotations

import base64
import io
import os
import queue
import subprocess
import sys
import tkinter as tk
import webbrowser
from pathlib import Path
from tkinter import filedialog, ttk

from vital.app import forms as gm

POLL_MS = 100
VIEW_PX = 256             # the preview fits in a VIEW_PX x VIEW_PX box (a batch: 2x wider)
_DEFAULTS = {"steps": "150", "size": "128"}
_ERROR, _OK = "#b00020", "#205020"


def photo(image, box: tuple[int, int] = (VIEW_PX, VIEW_PX)) -> tk.PhotoImage:
    """A PIL image scaled to fit ``box`` (small images by whole pixels) as a Tk image (PNG
    data: Tk 8.6 reads it, so PIL.ImageTk is not needed)."""
    from PIL import Image
    scale = min(box[0] / image.width, box[1] / image.height)
    if scale >= 1:
        scale = int(scale)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    buffer = io.BytesIO()
    image.convert("RGB").resize(size, resample).save(buffer, format="PNG")
    return tk.PhotoImage(data=base64.b64encode(buffer.getvalue()))


def open_in_file_manager(path: str) -> None:
    if sys.platform.startswith("win"):
        os.startfile(path)  # noqa: S606 (a folder the run wrote)
    else:
        opener = "open" if sys.platform == "darwin" else "xdg-open"
        subprocess.Popen([opener, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def atlas_page(folder: Path) -> Path | None:
    """``folder``'s atlas page: its index.html next to atlas.json, else the newest such page
    one level down; None if there is none."""
    def page(site: Path) -> Path | None:
        index = site / "index.html"
        return index if index.is_file() and (site / "atlas.json").is_file() else None

    if page(folder):
        return page(folder)
    found = [p for p in (page(sub) for sub in sorted(folder.glob("*/")) if sub.is_dir()) if p]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class VitalApp:
    """The window. Buttons call ``run``, ``stop``, ``save_config`` and ``open_folder``; tests
    call them (or ``buttons[name].invoke()``) the same way."""

    def __init__(self, root: tk.Tk, out_dir: str = "", model: str = "efficientnet-lite0"):
        self.root, self.out_dir = root, out_dir
        self.modes = gm.modes()
        self.queue: queue.Queue = queue.Queue()
        self.worker: gm.RunWorker | None = None
        self.loaders: list = []                           # threads loading model infos
        self.infos: dict[str, gm.ModelInfo | str] = {}   # spec -> info, or the load error
        self.last_cfg, self.last_mode, self.run_dir = None, None, None
        self.image = None                                 # keeps the Tk image alive
        self._make_vars(model)
        self._build()
        self.set_mode("class")
        self.request_model_info()
        root.protocol("WM_DELETE_WINDOW", self.close)
        self._poll_id = root.after(POLL_MS, self._poll)

    # ------------------------------------------------------------ variables

    def _make_vars(self, model: str) -> None:
        s = tk.StringVar
        self.mode = s(value="class")
        self.model = s(value=model)
        self.fields = {name: s(value=value) for name, value in _DEFAULTS.items()}
        for name in ("target", "layer", "neuron", "base", "add", "sub", "concept_target",
                     "concept_layer"):
            self.fields[name] = s()
        self.fields["target"].set("espresso")
        self.fields["concept_target"].set("espresso")
        self.fields["neuron"].set("0")
        self.fields["base"].set(f"{gm.BUNDLED_ROOT}/espresso/view_00.png")
        self.fields["add"].set(f"{gm.BUNDLED_ROOT}/tabby/view_00.png")
        self.refs = {k: s(value=str(gm.default_of(m.cfg_cls, m.ref_field)) if m.ref_field else "")
                     for k, m in self.modes.items()}
        self.keys = {k: {key.field: s(value=str(gm.default_of(m.cfg_cls, key.field)))
                         for key in m.keys} for k, m in self.modes.items()}
        self.status, self.loss, self.opinion = s(), s(), s()
        self.model_note, self.out_path, self.message = s(), s(), s()

    # ------------------------------------------------------------ widgets

    def _build(self) -> None:
        self.root.title("VITAL feature visualisation")
        frame = ttk.Frame(self.root, padding=8)
        frame.grid(sticky="nsew")
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)
        form = ttk.Frame(frame)
        form.grid(row=0, column=0, sticky="nw")
        view = ttk.Frame(frame, padding=(12, 0, 0, 0))
        view.grid(row=0, column=1, sticky="nsew")
        frame.columnconfigure(1, weight=1)
        self._build_mode_row(form)
        self._build_model_row(form)
        self._build_targets(form)
        self._build_settings(form)
        self._build_buttons(form)
        self._build_view(view)

    def _build_mode_row(self, form) -> None:
        row = ttk.Frame(form)
        row.grid(row=0, column=0, columnspan=3, sticky="w", pady=(0, 6))
        ttk.Label(row, text="Mode").pack(side="left", padx=(0, 8))
        for key, mode in self.modes.items():
            ttk.Radiobutton(row, text=mode.title, value=key, variable=self.mode,
                            command=lambda k=key: self.set_mode(k)).pack(side="left")

    def _build_model_row(self, form) -> None:
        ttk.Label(form, text="Model").grid(row=1, column=0, sticky="w", padx=(0, 6))
        self.model_box = ttk.Combobox(form, textvariable=self.model, values=gm.MODEL_CHOICES,
                                      width=34)
        self.model_box.grid(row=1, column=1, sticky="we")
        for event in ("<<ComboboxSelected>>", "<Return>", "<FocusOut>"):
            self.model_box.bind(event, lambda _e: self.request_model_info())
        ttk.Button(form, text="File...", command=self._pick_model_file).grid(row=1, column=2)
        ttk.Label(form, textvariable=self.model_note, foreground="#555").grid(
            row=2, column=1, columnspan=2, sticky="w")

    def _build_targets(self, form) -> None:
        """One frame per mode's target, stacked in the same cell; ``set_mode`` raises one."""
        self.target_frames = {}
        for key, build in (("class", self._class_target), ("inner", self._neuron_target),
                           ("arithmetic", self._arithmetic_target),
                           ("concept", self._concept_target)):
            box = ttk.LabelFrame(form, text="Target", padding=6)
            box.grid(row=3, column=0, columnspan=3, sticky="we", pady=6)
            build(box)
            self.target_frames[key] = box
        ttk.Label(form, text="References").grid(row=4, column=0, sticky="w", padx=(0, 6))
        self.ref_box = ttk.Combobox(form, width=34)
        self.ref_box.grid(row=4, column=1, sticky="we")
        self.ref_button = ttk.Button(form, text="Folder...", command=self._pick_folder)
        self.ref_button.grid(row=4, column=2)

    def _class_box(self, box, var, row: int, label: str = "Class") -> ttk.Combobox:
        ttk.Label(box, text=label).grid(row=row, column=0, sticky="w", padx=(0, 6))
        combo = ttk.Combobox(box, textvariable=var, width=32)
        combo.grid(row=row, column=1, sticky="we")
        combo.bind("<KeyRelease>", lambda _e: self._complete(combo, var))
        return combo

    def _class_target(self, box) -> None:
        self.class_box = self._class_box(box, self.fields["target"], 0)
        ttk.Label(box, text="type to complete from the model's classes (CLIP: or a prompt)",
                  foreground="#555").grid(row=1, column=1, sticky="w")

    def _neuron_target(self, box) -> None:
        ttk.Label(box, text="Layer").grid(row=0, column=0, sticky="w", padx=(0, 6))
        self.layer_box = ttk.Combobox(box, textvariable=self.fields["layer"], width=32)
        self.layer_box.grid(row=0, column=1, sticky="we")
        self.layer_box.bind("<<ComboboxSelected>>", lambda _e: self._show_neuron_range())
        ttk.Label(box, text="Neuron").grid(row=1, column=0, sticky="w", padx=(0, 6))
        ttk.Spinbox(box, textvariable=self.fields["neuron"], from_=0, to=100_000,
                    width=8).grid(row=1, column=1, sticky="w")
        self.neuron_note = tk.StringVar()
        ttk.Label(box, textvariable=self.neuron_note, foreground="#555").grid(
            row=2, column=1, sticky="w")

    def _arithmetic_target(self, box) -> None:
        rows = (("base", "Base (file or word)"), ("sub", "Subtract (comma-separated)"),
                ("add", "Add (comma-separated)"))
        for row, (name, label) in enumerate(rows):
            ttk.Label(box, text=label).grid(row=row, column=0, sticky="w", padx=(0, 6))
            ttk.Entry(box, textvariable=self.fields[name], width=30).grid(row=row, column=1)
        ttk.Button(box, text="File...", command=self._pick_base).grid(row=0, column=2)

    def _concept_target(self, box) -> None:
        self.concept_box = self._class_box(box, self.fields["concept_target"], 0)
        ttk.Label(box, text="Layer").grid(row=1, column=0, sticky="w", padx=(0, 6))
        self.concept_layer_box = ttk.Combobox(box, textvariable=self.fields["concept_layer"],
                                              width=32)
        self.concept_layer_box.grid(row=1, column=1, sticky="we")
        ttk.Label(box, text="empty layer = the model's deepest default layer",
                  foreground="#555").grid(row=2, column=1, sticky="w")

    def _build_settings(self, form) -> None:
        box = ttk.LabelFrame(form, text="Settings", padding=6)
        box.grid(row=5, column=0, columnspan=3, sticky="we", pady=6)
        ttk.Label(box, text="Steps").grid(row=0, column=0, sticky="w", padx=(0, 6))
        ttk.Spinbox(box, textvariable=self.fields["steps"], from_=1, to=100_000, increment=50,
                    width=8).grid(row=0, column=1, sticky="w")
        ttk.Label(box, text="Size (px, 0 = model's)").grid(row=0, column=2, sticky="w", padx=6)
        ttk.Spinbox(box, textvariable=self.fields["size"], from_=0, to=4096, increment=32,
                    width=6).grid(row=0, column=3, sticky="w")
        self.key_labels, self.key_entries = [], []
        for k in range(2):
            label = ttk.Label(box)
            label.grid(row=1, column=2 * k, sticky="w", padx=(0 if k == 0 else 6, 0))
            entry = ttk.Entry(box, width=8)
            entry.grid(row=1, column=2 * k + 1, sticky="w")
            self.key_labels.append(label)
            self.key_entries.append(entry)

    def _build_buttons(self, form) -> None:
        row = ttk.Frame(form)
        row.grid(row=6, column=0, columnspan=3, sticky="w", pady=6)
        self.buttons = {}
        for name, text, command in (("run", "Run", self.run), ("stop", "Stop", self.stop),
                                    ("save", "Save config", self.save_config),
                                    ("open", "Open folder", self.open_folder),
                                    ("atlas", "Open atlas...", self.open_atlas)):
            self.buttons[name] = ttk.Button(row, text=text, command=command)
            self.buttons[name].pack(side="left", padx=(0, 4))
        self._set_running(False)

    def _build_view(self, view) -> None:
        self.canvas = ttk.Label(view, relief="sunken", anchor="center")
        self.canvas.grid(row=0, column=0, sticky="nw")
        self._blank()
        self.bar = ttk.Progressbar(view, length=VIEW_PX, mode="determinate")
        self.bar.grid(row=1, column=0, sticky="w", pady=4)
        for row, var in enumerate((self.status, self.loss), start=2):
            ttk.Label(view, textvariable=var).grid(row=row, column=0, sticky="w", padx=(0, 6))
        wrap = 2 * VIEW_PX
        ttk.Label(view, textvariable=self.opinion, wraplength=wrap).grid(row=4, column=0,
                                                                          sticky="w")
        ttk.Label(view, textvariable=self.out_path, wraplength=wrap, foreground=_OK).grid(
            row=5, column=0, sticky="w")
        self.message_label = ttk.Label(view, textvariable=self.message, wraplength=wrap,
                                       foreground=_ERROR)
        self.message_label.grid(row=6, column=0, sticky="w", padx=(0, 6))

    def _blank(self) -> None:
        from PIL import Image
        self.image = photo(Image.new("RGB", (VIEW_PX, VIEW_PX), "#dddddd"))
        self.canvas.configure(image=self.image)

    # ------------------------------------------------------------ mode and model

    def set_mode(self, key: str) -> None:
        """Show the target, reference folder and key settings of mode ``key``."""
        mode = self.modes[key]
        self.mode.set(key)
        for other, box in self.target_frames.items():
            if other == key:
                box.grid()
            else:
                box.grid_remove()
        state = "normal" if mode.ref_field else "disabled"
        self.ref_box.configure(textvariable=self.refs[key], values=gm.bundled_choices(key),
                               state=state)
        self.ref_button.configure(state=state)
        for k, (label, entry) in enumerate(zip(self.key_labels, self.key_entries)):
            if k < len(mode.keys):
                label.configure(text=_first_upper(mode.keys[k].label))
                entry.configure(textvariable=self.keys[key][mode.keys[k].field], state="normal")
            else:
                label.configure(text="")
                entry.configure(state="disabled")

    def request_model_info(self) -> None:
        """Load the model's classes and layers in the background (cached per spec)."""
        spec = self.model.get().strip()
        if not spec:
            return
        if isinstance(self.infos.get(spec), gm.ModelInfo) or self.infos.get(spec) == "loading":
            self._apply_info(spec)     # known (a failed load is tried again: files may appear)
            return
        self.infos[spec] = "loading"
        self.model_note.set(f"loading {spec} ...")
        self.loaders.append(gm.start_thread(gm.load_info_into, spec, self.queue))

    def _apply_info(self, spec: str) -> None:
        info = self.infos.get(spec)
        if spec != self.model.get().strip() or info == "loading":
            return
        if isinstance(info, str):
            self.model_note.set("cannot load this model")
            self._say(info)
            return
        self.model_note.set(info.describe())
        if self.message.get().startswith("The model "):
            self._say("")              # an earlier model's load error no longer applies
        names = [i.name for i in info.layers]
        self.layer_box.configure(values=names)
        self.concept_layer_box.configure(values=info.all_layers)
        if self.fields["layer"].get() not in names and names:
            default = gm.default_of(self.modes["inner"].cfg_cls, "layer")
            self.fields["layer"].set(default if default in names else names[len(names) // 2])
        self._show_neuron_range()

    def _show_neuron_range(self) -> None:
        info = self.infos.get(self.model.get().strip())
        layers = {i.name: i for i in info.layers} if isinstance(info, gm.ModelInfo) else {}
        layer = layers.get(self.fields["layer"].get())
        self.neuron_note.set(f"0 .. {layer.channels - 1}" if layer else "")

    def _complete(self, combo: ttk.Combobox, var: tk.StringVar) -> None:
        info = self.infos.get(self.model.get().strip())
        if isinstance(info, gm.ModelInfo):
            combo.configure(values=gm.complete(var.get(), info.classes))

    # ------------------------------------------------------------ pickers

    def _pick_model_file(self) -> None:
        path = filedialog.askopenfilename(title="Model weights", filetypes=[
            ("weights", "*.safetensors *.pt *.pth"), ("all files", "*")])
        if path:
            self.model.set(path)
            self.request_model_info()

    def _pick_folder(self) -> None:
        path = filedialog.askdirectory(title="Reference images", mustexist=True)
        if path:
            self.refs[self.mode.get()].set(path)

    def _pick_base(self) -> None:
        path = filedialog.askopenfilename(title="Base image")
        if path:
            self.fields["base"].set(path)

    # ------------------------------------------------------------ run, stop, save, open

    def form(self) -> dict:
        """The form's strings, keyed as ``gui_modes.build_cfg`` reads them."""
        key = self.mode.get()
        values = {name: var.get() for name, var in self.fields.items()}
        if key == "concept":
            values.update(target=values["concept_target"], layer=values["concept_layer"])
        values.update(model=self.model.get(), ref_dir=self.refs[key].get())
        values.update({f: v.get() for f, v in self.keys[key].items()})
        return values

    def current_cfg(self):
        mode = self.modes[self.mode.get()]
        return mode, gm.build_cfg(mode, self.form(), self.out_dir)

    def run(self) -> bool:
        """Start a run with the form's settings; False (and a message) if it cannot start."""
        if self.worker is not None and self.worker.alive():
            return False
        try:
            mode, cfg = self.current_cfg()
        except gm.FormError as err:
            self._say(str(err))
            return False
        self.last_cfg, self.last_mode, self.run_dir = cfg, mode, None
        self._say("")
        self.out_path.set("")
        self.opinion.set("")
        self.loss.set("")
        self.bar.configure(value=0, maximum=1)
        self.status.set("starting ...")
        self.worker = gm.RunWorker(mode, cfg, self.queue).start()
        self._set_running(True)
        return True

    def stop(self) -> None:
        if self.worker is not None and self.worker.alive():
            self.worker.stop()
            self.status.set("stopping after this step ...")

    def save_config(self, path: str | None = None) -> str | None:
        """Write the last run's CFG (before any run: the form's) as JSON for ``--json_cfg``."""
        from vital.config import dump_cfg
        try:
            mode, cfg = (self.last_mode, self.last_cfg) if self.last_cfg else self.current_cfg()
        except gm.FormError as err:
            self._say(str(err))
            return None
        path = path or filedialog.asksaveasfilename(
            title="Save config", defaultextension=".json", initialfile=f"{mode.key}_config.json",
            filetypes=[("JSON", "*.json")])
        if not path:
            return None
        try:
            dump_cfg(cfg, path)
        except OSError as err:
            self._say(f"Could not write {path}: {err.strerror or err}.")
            return None
        self.status.set(f"saved {path}; run it with: python {mode.script} --json_cfg {path}")
        return str(path)

    def open_folder(self) -> None:
        if not self.run_dir:
            self._say("No output folder yet: run first.")
            return
        try:
            open_in_file_manager(self.run_dir)
        except OSError as err:
            self._say(f"Could not open {self.run_dir}: {err.strerror or err}.")

    def open_atlas(self, folder: str | None = None) -> str | None:
        """Open the atlas (``atlas.py``) in ``folder`` (asked for when None) in the web browser:
        its ``index.html``, or the newest atlas among its subfolders (an ``out_atlas`` folder);
        returns the page opened, or None with a sentence in the window."""
        if folder is None:
            start = Path("out_atlas") if Path("out_atlas").is_dir() else Path.cwd()
            folder = filedialog.askdirectory(title="Atlas folder (atlas.py's output)",
                                             initialdir=str(start))
            if not folder:
                return None
        page = atlas_page(Path(folder))
        if page is None:
            self._say(f"{folder} holds no atlas (an index.html next to atlas.json); build one "
                      f"with atlas.py or pick its site folder.")
            return None
        webbrowser.open(page.resolve().as_uri())
        self._say(f"Opened the atlas {page.parent}.")
        return str(page)

    def close(self) -> None:
        """Closing stops a run first (what exists is saved) and lets a model that is loading
        finish (the process would abort if it ended inside torch's loading code), then closes
        the window."""
        if self.worker is not None and self.worker.alive():
            self.worker.stop()
            self.status.set("stopping the run before closing ...")
            self.root.after(POLL_MS, self.close)
            return
        self.loaders = [t for t in self.loaders if t.is_alive()]
        if self.loaders:
            self.status.set("closing once the model has finished loading ...")
            self.root.after(POLL_MS, self.close)
            return
        self.root.after_cancel(self._poll_id)
        self.root.destroy()

    # ------------------------------------------------------------ the worker's messages

    def _poll(self) -> None:
        latest = None
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "progress":
                latest = item          # only the newest image is worth drawing
                continue
            if latest is not None:     # draw it before what came after it (e.g. "done")
                self._show_progress(*latest[1:])
                latest = None
            self._handle(item)
        if latest is not None:
            self._show_progress(*latest[1:])
        self._poll_id = self.root.after(POLL_MS, self._poll)

    def _handle(self, item: tuple) -> None:
        kind, rest = item[0], item[1:]
        if kind == "model_info":
            spec, info, error = rest
            self.infos[spec] = info if info is not None else error
            self._apply_info(spec)
        elif kind == "phase":
            self.status.set(rest[0])
        elif kind == "opinion":
            self.opinion.set(rest[0])
        elif kind == "done":
            self._finished(*rest)
        elif kind == "error":
            self._set_running(False)
            self.status.set("not run")
            self._say(rest[0])

    def _show_progress(self, step: int, total: int, loss: float, image) -> None:
        self.bar.configure(maximum=total, value=step)
        self.status.set(f"step {step} / {total}")
        self.loss.set(f"loss {loss:.4g}")
        self._show_image(image)

    def _show_image(self, image) -> None:
        wide = image.width > image.height          # a batch is shown as a row
        self.image = photo(image, (2 * VIEW_PX if wide else VIEW_PX, VIEW_PX))
        self.canvas.configure(image=self.image)

    def _finished(self, run_dir: str, status: str, steps: int) -> None:
        from PIL import Image
        self._set_running(False)
        self.run_dir = run_dir
        final = Path(run_dir) / "final.png"
        batch = final.with_name("final_batch.png")
        shown = batch if batch.is_file() else final
        if shown.is_file():
            with Image.open(shown) as image:
                self._show_image(image.copy())
        said = {"finished": "finished", "stopped": "stopped; saved what exists"}
        self.status.set(f"{said.get(status, status)} after {steps} steps")
        self.out_path.set(f"output: {Path(run_dir).resolve()}")

    def _set_running(self, running: bool) -> None:
        self.buttons["run"].configure(state="disabled" if running else "normal")
        self.buttons["stop"].configure(state="normal" if running else "disabled")
        for name in ("save", "open"):
            self.buttons[name].configure(state="disabled" if running else "normal")

    def _say(self, text: str) -> None:
        self.message.set(text)


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def main(argv: list[str] | None = None) -> int:
    """Open the window; ``--out_dir DIR`` puts the run folders under DIR."""
    import argparse
    parser = argparse.ArgumentParser(description="VITAL desktop GUI")
    parser.add_argument("--out_dir", default="", help="parent of the run folders "
                        "(default out_<mode> in the current folder)")
    args = parser.parse_args(argv)
    try:
        root = tk.Tk()
    except tk.TclError as err:
        print(f"error: cannot open a window ({err}); is a display available?", file=sys.stderr)
        return 2
    VitalApp(root, out_dir=args.out_dir)
    root.mainloop()
    return 0

// Shows the text any Blended Diffusion node returns in its "ui" (message.text: RankByCLIP's scores, the Evaluate
// report, NULL-text Invert's report, Save Inversion's path, the Fidelity Curve's CSV) in a read-only text box on
// the node. A node belongs to the pack by its category (every one is "Blended Diffusion" or below it), so a new
// node that returns text shows it without being listed here.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const CATEGORY = "Blended Diffusion";

function ofThisPack(nodeData) {
  const category = nodeData?.category ?? "";
  return category === CATEGORY || category.startsWith(CATEGORY + "/");
}

app.registerExtension({
  name: "BlendedDiffusion.ShowScores",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!ofThisPack(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (!Array.isArray(message?.text)) return;  // this node returned no text
      const text = message.text.join("\n");
      let widget = this.widgets?.find((w) => w.name === "bd_report");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "bd_report", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.style.opacity = 0.8;
        widget.serialize = false;  // display only: not saved as a widget value
      }
      widget.value = text;
      this.setSize?.([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
    };
  },
});

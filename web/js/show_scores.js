// Shows the text a Blended Diffusion node returns in its "ui" (RankByCLIP scores, Evaluate report)
// in a read-only text box on the node.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const NODES = ["RankByCLIP", "BlendedDiffusionEvaluate"];

app.registerExtension({
  name: "BlendedDiffusion.ShowScores",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
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

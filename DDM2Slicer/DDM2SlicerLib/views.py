"""The comparison layout: input | denoised | residual, linked axial views, FA as an overlay."""

from __future__ import annotations

import slicer

# A custom layout id must be above vtkMRMLLayoutNode.SlicerLayoutUserView (100).
COMPARE_LAYOUT_ID = 5801
COMPARE_VIEWS = ("Red", "Yellow", "Green")  # input, denoised, residual

_VIEW_XML = """ <item>
  <view class="vtkMRMLSliceNode" singletontag="{name}">
   <property name="orientation" action="default">Axial</property>
   <property name="viewlabel" action="default">{label}</property>
   <property name="viewcolor" action="default">{color}</property>
  </view>
 </item>"""
COMPARE_LAYOUT_XML = "<layout type=\"horizontal\">\n" + "\n".join(
    _VIEW_XML.format(name=name, label=label, color=color)
    for name, label, color in (("Red", "Input", "#F34A33"), ("Yellow", "Denoised", "#EDD54C"),
                               ("Green", "Residual", "#6EB04B"))) + "\n</layout>"


def compositeNodes() -> dict[str, object]:
    """The slice composite nodes of the three views, by view name."""
    return {node.GetLayoutName(): node for node in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
            if node.GetLayoutName() in COMPARE_VIEWS}


def showCompareLayout() -> None:
    """Register (once) and select the 1x3 layout; without a layout node (no main window) do nothing."""
    layoutNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layoutNode is None:
        return
    if not layoutNode.IsLayoutDescription(COMPARE_LAYOUT_ID):
        layoutNode.AddLayoutDescription(COMPARE_LAYOUT_ID, COMPARE_LAYOUT_XML)
    layoutNode.SetViewArrangement(COMPARE_LAYOUT_ID)


def setupCompare(inputNode, denoisedNode, residualNode=None, overlayNode=None, overlayOpacity: float = 0.5,
                 diffusionComponent: int = 1) -> dict[str, object]:
    """Show input | denoised | residual side by side, linked, with the same gradient component.

    Returns the composite nodes it configured, by view name.
    """
    showCompareLayout()
    for dwiNode in (inputNode, denoisedNode):
        display = dwiNode.GetDisplayNode()
        if display is None:
            dwiNode.CreateDefaultDisplayNodes()
            display = dwiNode.GetDisplayNode()
        display.SetDiffusionComponent(diffusionComponent)
    backgrounds = {"Red": inputNode, "Yellow": denoisedNode, "Green": residualNode}
    composites = compositeNodes()
    for name, composite in composites.items():
        background = backgrounds[name]
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        foreground = overlayNode if name != "Green" else None
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(overlayOpacity)
        # Linked control makes a slice scroll or zoom in one view move the others with it.
        composite.SetLinkedControl(True)
    layoutManager = slicer.app.layoutManager()
    if layoutManager is not None:
        for name in COMPARE_VIEWS:
            sliceWidget = layoutManager.sliceWidget(name)
            if sliceWidget is not None:
                sliceWidget.mrmlSliceNode().SetOrientation("Axial")
                sliceWidget.fitSliceToBackground()
    return composites


def setOverlayOpacity(opacity: float) -> None:
    for name, composite in compositeNodes().items():
        if name != "Green":
            composite.SetForegroundOpacity(opacity)

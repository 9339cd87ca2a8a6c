"""Work a site does on its own data: radiomics extraction, image preparation, local CNN training,
DP-SGD, Grad-CAM."""

/* dicom.h — DICOM images in, 8-bit RGB out, as a radiology viewer shows them;
 * the result then goes through image.h's CLIP preprocessing like a PNG.
 *
 *     mm_dicom_options o;  mm_dicom_options_default(&o);
 *     o.window = MM_DICOM_WINDOW_LUNG;          // or keep the file's window
 *     mm_image *img = NULL;  char err[256];
 *     int rc = mm_dicom_decode(bytes, n, &o, 0, &img, err, sizeof err);
 *     if (rc != MM_OK) { log("%s: %s", mm_status_str(rc), err); return rc; }
 *     ... mm_image_preprocess(img, ...); mm_image_destroy(&img);
 *
 * image.h's mm_image_decode / mm_image_probe / mm_image_load_file accept
 * DICOM too (media type "application/dicom", or "DICM" at byte 128) with the
 * default options; call this module directly to choose a window or a frame.
 *
 * The display pipeline (DICOM PS3.3 C.11, the order a viewer applies it):
 *  1. stored values: each sample's Bits Stored bits below High Bit, signed
 *     (two's complement) when Pixel Representation is 1; Bits Allocated 1,
 *     8, 16 or 32, any Bits Stored up to that.
 *  2. modality LUT (greyscale only): the Modality LUT Sequence's first item
 *     when present, else Rescale Slope / Intercept (default 1 / 0).
 *  3. VOI LUT (greyscale only), the first of these that applies:
 *     a named preset from the request (CT only, values in Hounsfield units):
 *         lung         W 1500 / L -600
 *         mediastinum  W  350 / L   50
 *         bone         W 1800 / L  400
 *         brain        W   80 / L   40
 *         full         the full range of this frame's modality values
 *     the file's first Window Center / Width (with its VOI LUT Function:
 *     LINEAR, LINEAR_EXACT or SIGMOID); the VOI LUT Sequence's first item;
 *     else the full range (min..max) of the frame's modality values.
 *     The output is 0..255 directly (no intermediate bit depth).
 *  4. MONOCHROME1 is inverted (255 - v); greyscale is replicated to R, G, B.
 *  Colour: RGB as is; YBR_FULL and YBR_FULL_422 (upsampled, pairs of
 *  pixels share Cb/Cr) converted with the JFIF/PS3.3 C.7.6.3.1.2 equations;
 *  JPEG 2000's YBR_RCT / YBR_ICT are RGB once decoded; PALETTE COLOR looked
 *  up in its red/green/blue LUTs (8- or 16-bit entries; segmented palettes
 *  are refused); planar configuration 0 or 1; samples over 8 bits are scaled
 *  from 0..2^bits-1 to 0..255. Rounding is to nearest everywhere.
 *  Multi-frame: the middle frame ((frames + 1) / 2, 1-based) by default.
 *
 * Transfer syntaxes: all that Debian's GDCM decodes: implicit/explicit
 * little endian, explicit big endian, deflated, RLE, JPEG baseline,
 * extended and lossless, JPEG-LS, JPEG 2000 (lossless and lossy). Native
 * (uncompressed) pixel data is read directly, one frame only; encapsulated
 * data is decoded by GDCM, all frames at once (so the pixel limit counts
 * every frame for those; see mm_dicom_info.decode_pixels).
 *
 * Limits: the header is read and checked (sides <= MM_IMAGE_MAX_SIDE,
 * decode_pixels <= max_pixels, Pixel Data as long as the header says)
 * before any pixel memory is allocated or any codec runs.
 *
 * Privacy: nothing here logs, and no error message quotes an attribute
 * value other than the image-describing ones (sizes, bit depths, the
 * photometric interpretation, transfer syntax, modality) — never a patient
 * or study attribute. mm_dicom_info carries the SOP Instance UID only so
 * that an audit can store a salted hash of it.
 *
 * Errors: MM_EINVAL (bad options, over a limit, a frame that does not
 * exist, a CT preset for a non-CT image), MM_EPROTO (not DICOM, a broken
 * element, missing or inconsistent image attributes, short pixel data, a
 * codec failure: the message names the attribute or the codec),
 * MM_EUNSUPPORTED (a valid object medmoe does not display: no Pixel Data
 * (an SR, an RT plan), float pixel data, segmented palettes, YBR_PARTIAL,
 * video transfer syntaxes), MM_ENOMEM.
 *
 * Why GDCM and not DCMTK: Debian's GDCM 3.0 decodes every transfer syntax
 * above, JPEG 2000 included (through OpenJPEG); Debian's DCMTK 3.6.7 has no
 * JPEG 2000 codec (that is a commercial add-on), and JPEG 2000 is common in
 * PACS archives. GDCM is used for parsing and codecs only (dicom_gdcm.cc);
 * its own image interpretation is bypassed, so the pipeline above is this
 * file's and is the same for every transfer syntax.
 *
 * Thread safety: no global state apart from GDCM's quietened trace flags
 * (set once); calls are independent. */
#ifndef MM_DICOM_H
#define MM_DICOM_H

#include <stddef.h>
#include <stdint.h>

#include "image.h"

/* How to choose the VOI window (see the pipeline above). */
typedef enum mm_dicom_window {
    MM_DICOM_WINDOW_AUTO = 0,    /* the file's window, else its VOI LUT, else full */
    MM_DICOM_WINDOW_FULL,        /* the frame's full range of modality values     */
    MM_DICOM_WINDOW_LUNG,        /* CT: W 1500 / L -600 HU                        */
    MM_DICOM_WINDOW_MEDIASTINUM, /* CT: W 350 / L 50 HU                           */
    MM_DICOM_WINDOW_BONE,        /* CT: W 1800 / L 400 HU                         */
    MM_DICOM_WINDOW_BRAIN,       /* CT: W 80 / L 40 HU                            */
} mm_dicom_window;

typedef struct mm_dicom_options {
    mm_dicom_window window; /* default MM_DICOM_WINDOW_AUTO                       */
    uint32_t frame;         /* 1-based frame number; 0 = the middle frame         */
} mm_dicom_options;

void mm_dicom_options_default(mm_dicom_options *o);

/* "" or "auto", "full", "lung", "mediastinum", "bone", "brain" (lower case)
 * -> *out; MM_EINVAL naming the accepted names otherwise. */
int mm_dicom_window_parse(const char *name, mm_dicom_window *out, char *err, size_t errlen);
/* The name mm_dicom_window_parse accepts for w ("auto" for AUTO). */
const char *mm_dicom_window_name(mm_dicom_window w);

/* What the header says, for admission and the audit. */
typedef struct mm_dicom_info {
    size_t cols, rows;         /* the output image's width and height            */
    size_t frames;             /* Number of Frames (1 when absent)               */
    size_t decode_pixels;      /* pixels decoding costs: rows * cols, times the
                                  frames when they are encapsulated (all decoded) */
    unsigned samples;          /* Samples per Pixel: 1 or 3                       */
    unsigned bits_allocated;   /* 1, 8, 16, 32                                    */
    unsigned bits_stored;      /* 1..bits_allocated                               */
    int is_signed;             /* Pixel Representation 1                          */
    int encapsulated;          /* compressed pixel data (decoded by GDCM)         */
    char photometric[20];      /* e.g. "MONOCHROME2", "YBR_FULL_422"              */
    char modality[20];         /* e.g. "CT", "" when absent                       */
    char transfer_syntax[68];  /* UID                                             */
    char sop_instance_uid[68]; /* for a salted hash in the audit; never logged    */
} mm_dicom_info;

/* 1 when the bytes are to be read as DICOM: media_type "application/dicom",
 * or no media type and "DICM" at byte 128 (the Part 10 preamble). A bare
 * data set without the preamble is DICOM only when the media type says so. */
int mm_dicom_is(const void *bytes, size_t len, const char *media_type);

/* Reads the header only (stops before Pixel Data) and checks the image
 * attributes; no pixel memory. Fills *info. */
int mm_dicom_probe(const void *bytes, size_t len, mm_dicom_info *info, char *err, size_t errlen);

/* Whether o can be applied to the image info describes: the frame exists,
 * a CT preset meets a CT greyscale image. MM_EINVAL naming the option. */
int mm_dicom_check_options(const mm_dicom_info *info, const mm_dicom_options *o, char *err,
                           size_t errlen);

/* Decode one frame through the display pipeline into a new RGB image
 * (*out, owned by the caller). o NULL = defaults. max_pixels 0 = image.h's
 * default; it bounds info.decode_pixels. */
int mm_dicom_decode(const void *bytes, size_t len, const mm_dicom_options *o, size_t max_pixels,
                    mm_image **out, char *err, size_t errlen);

/* libFuzzer-friendly entry point: probe and decode data[0..size) with the
 * default options and a 16 Mi pixel limit, free everything, return 0.
 * A fuzz target is one line:
 *   int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return mm_dicom_fuzz_one(d, n); } */
int mm_dicom_fuzz_one(const uint8_t *data, size_t size);

#endif

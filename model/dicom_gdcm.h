/* dicom_gdcm.h — the whole of medmoe's contact with GDCM (C++), as a C
 * interface used by dicom.c only. It parses a DICOM byte buffer into a data
 * set, hands out element values, and decodes encapsulated (compressed) pixel
 * data. Everything else (which attributes mean what, frames, LUTs, colour)
 * is C, in dicom.c.
 *
 * Values: GDCM converts binary values (US, SS, UL, OW pixel data, ...) to
 * the host's byte order when it reads an explicit big-endian file and
 * inflates deflated data sets, so what mm_gdcm_value returns is
 * little-endian (this host) whatever the transfer syntax.
 *
 * Thread safety: a file object is used by one thread at a time; different
 * objects may be used at once (GDCM's dictionaries are read-only after its
 * static initialisation). GDCM's own warning and error printing (to
 * stderr) is switched off once, on first use: its messages could quote
 * attribute values, and logs must never carry patient data. */
#ifndef MM_DICOM_GDCM_H
#define MM_DICOM_GDCM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mm_gdcm_file mm_gdcm_file;

/* Parse bytes[0..len) (a Part 10 file, or a bare data set, which GDCM
 * accepts when it can infer the encoding). headers_only: stop before Pixel
 * Data (7FE0,0010), whose value is then absent. The bytes are not kept
 * (GDCM copies what it needs). MM_EPROTO with GDCM's reason on failure. */
int mm_gdcm_parse(const void *bytes, size_t len, int headers_only, mm_gdcm_file **out, char *err,
                  size_t errlen);
void mm_gdcm_free(mm_gdcm_file **f);

/* Value bytes of the element tag = (group << 16 | element): at the top
 * level when seq == 0, else in the first item of the sequence seq. Returns
 * 1 and sets *data / *len (len may be 0) when the element is present with a
 * plain value; 0 when it is absent, a sequence, or encapsulated. The bytes
 * belong to f. */
int mm_gdcm_value(const mm_gdcm_file *f, uint32_t seq, uint32_t tag, const uint8_t **data,
                  size_t *len);

/* Transfer syntax UID of the data set ("" when unknown); 1 when the Pixel
 * Data element is encapsulated (a compressed transfer syntax). */
const char *mm_gdcm_transfer_syntax(const mm_gdcm_file *f);
int mm_gdcm_encapsulated(const mm_gdcm_file *f);

/* What dicom.c has checked and decided about the pixel data; GDCM's codecs
 * are told exactly this (GDCM's own header interpretation is not used). */
typedef struct mm_gdcm_pixels {
    unsigned cols, rows, frames;    /* frames >= 1 */
    unsigned samples;               /* 1 or 3 */
    unsigned bits_allocated;        /* 8, 16, 32 */
    unsigned bits_stored, high_bit; /* as in the file (checked) */
    unsigned pixel_representation;  /* 0 unsigned, 1 two's complement */
    unsigned planar;                /* planar configuration, 0 or 1 */
    const char *photometric;        /* the file's Photometric Interpretation */
} mm_gdcm_pixels;

/* Decode the encapsulated pixel data of all frames into dst (dstlen bytes,
 * at least cols*rows*frames*samples*bits_allocated/8). *written: the bytes
 * GDCM produced. YBR_FULL_422 comes out upsampled to 3 samples a pixel
 * (still YBR); JPEG 2000's YBR_RCT/ICT come out as RGB (the inverse
 * transform is part of the codestream). MM_EUNSUPPORTED for a transfer
 * syntax GDCM cannot decode, MM_EPROTO when decoding fails. */
int mm_gdcm_decode(const mm_gdcm_file *f, const mm_gdcm_pixels *px, uint8_t *dst, size_t dstlen,
                   size_t *written, char *err, size_t errlen);

/* The same for one frame held in one fragment (bytes of its item value), so
 * a multi-frame object decodes only the frame asked for. px->frames is 1. */
int mm_gdcm_decode_fragment(const char *ts_uid, const mm_gdcm_pixels *px, const uint8_t *frag,
                            size_t len, uint8_t *dst, size_t dstlen, size_t *written, char *err,
                            size_t errlen);

#ifdef __cplusplus
}
#endif
#endif

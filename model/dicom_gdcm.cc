/* dicom_gdcm.cc — the C interface of dicom_gdcm.h over GDCM 3.0. Kept
 * small on purpose: parsing, element access and the codecs are GDCM's;
 * every decision about the image is dicom.c's. No C++ exception leaves this
 * file. Why GDCM rather than DCMTK: Debian's GDCM decodes every transfer
 * syntax a PACS sends (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000
 * through OpenJPEG, RLE, deflate, big endian), while Debian's DCMTK has no
 * JPEG 2000 decoder at all; see dicom.h. */
#include "dicom_gdcm.h"

extern "C" {
#include "status.h"
}

#include <gdcmDataSet.h>
#include <gdcmFile.h>
#include <gdcmFragment.h>
#include <gdcmImage.h>
#include <gdcmItem.h>
#include <gdcmJPEG2000Codec.h>
#include <gdcmJPEGCodec.h>
#include <gdcmJPEGLSCodec.h>
#include <gdcmPhotometricInterpretation.h>
#include <gdcmReader.h>
#include <gdcmSequenceOfItems.h>
#include <gdcmTrace.h>
#include <gdcmTransferSyntax.h>

#include <cstring>
#include <istream>
#include <mutex>
#include <new>
#include <streambuf>
#include <string>

/* The caller's bytes as a read-only, seekable stream: GDCM reads from an
 * std::istream, and copying a 20 MB X-ray into a std::string first would
 * triple its memory. */
namespace {
struct MemBuf : std::streambuf {
    MemBuf(const char *b, size_t n) {
        char *p = const_cast<char *>(b); /* never written: no overflow/put area */
        setg(p, p, p + n);
    }
    pos_type seekoff(off_type off, std::ios_base::seekdir dir,
                     std::ios_base::openmode which) override {
        if (!(which & std::ios_base::in))
            return pos_type(off_type(-1));
        off_type base = dir == std::ios_base::beg   ? 0
                        : dir == std::ios_base::cur ? gptr() - eback()
                                                    : egptr() - eback();
        off_type to = base + off;
        if (to < 0 || to > egptr() - eback())
            return pos_type(off_type(-1));
        setg(eback(), eback() + to, egptr());
        return pos_type(to);
    }
    pos_type seekpos(pos_type pos, std::ios_base::openmode which) override {
        return seekoff(off_type(pos), std::ios_base::beg, which);
    }
};

std::once_flag g_quiet_once; /* GDCM's trace flags: set once, never changed after */

std::ostream g_null(nullptr); /* badbit: every write is dropped */

void quiet_gdcm() {
    std::call_once(g_quiet_once, [] {
        gdcm::Trace::DebugOff();
        gdcm::Trace::WarningOff();
        gdcm::Trace::ErrorOff();
        gdcm::Trace::SetStream(g_null);
        gdcm::Trace::SetDebugStream(g_null);
        gdcm::Trace::SetWarningStream(g_null);
        gdcm::Trace::SetErrorStream(g_null);
    });
}
} // namespace

struct mm_gdcm_file {
    gdcm::Reader reader; /* owns the parsed data set */
    std::string ts;      /* transfer syntax UID */
};

extern "C" int mm_gdcm_parse(const void *bytes, size_t len, int headers_only, mm_gdcm_file **out,
                             char *err, size_t errlen) {
    *out = nullptr;
    quiet_gdcm();
    mm_gdcm_file *f = new (std::nothrow) mm_gdcm_file;
    if (!f)
        return mm_errorf(err, errlen, MM_ENOMEM, "dicom: out of memory for the parser");
    try {
        MemBuf buf(static_cast<const char *>(bytes), len);
        std::istream is(&buf);
        f->reader.SetStream(is);
        bool ok =
            headers_only ? f->reader.ReadUpToTag(gdcm::Tag(0x7fe0, 0x0010)) : f->reader.Read();
        if (!ok) {
            delete f;
            return mm_errorf(err, errlen, MM_EPROTO,
                             "dicom: not a readable DICOM data set (%zu bytes; GDCM could not "
                             "parse it: truncated, not DICOM, or a broken element header)",
                             len);
        }
        const gdcm::TransferSyntax &ts = f->reader.GetFile().GetHeader().GetDataSetTransferSyntax();
        const char *uid = gdcm::TransferSyntax::GetTSString(ts);
        f->ts = uid ? uid : "";
        while (!f->ts.empty() && (f->ts.back() == '\0' || f->ts.back() == ' '))
            f->ts.pop_back();
    } catch (const std::bad_alloc &) {
        delete f;
        return mm_errorf(err, errlen, MM_ENOMEM, "dicom: out of memory while parsing");
    } catch (const std::exception &e) {
        delete f;
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: parse failed (%.160s)", e.what());
    } catch (...) {
        delete f;
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: parse failed");
    }
    *out = f;
    return MM_OK;
}

extern "C" void mm_gdcm_free(mm_gdcm_file **f) {
    if (!f || !*f)
        return;
    delete *f;
    *f = nullptr;
}

static const gdcm::DataElement *s_find(const gdcm::DataSet &ds, uint32_t tag) {
    gdcm::Tag t(uint16_t(tag >> 16), uint16_t(tag & 0xffff));
    if (!ds.FindDataElement(t))
        return nullptr;
    return &ds.GetDataElement(t);
}

extern "C" int mm_gdcm_value(const mm_gdcm_file *f, uint32_t seq, uint32_t tag,
                             const uint8_t **data, size_t *len) {
    *data = nullptr;
    *len = 0;
    try {
        const gdcm::DataSet *ds = &f->reader.GetFile().GetDataSet();
        if (seq) {
            const gdcm::DataElement *s = s_find(*ds, seq);
            if (!s)
                return 0;
            gdcm::SmartPointer<gdcm::SequenceOfItems> sq = s->GetValueAsSQ();
            if (!sq || sq->GetNumberOfItems() < 1)
                return 0;
            ds = &sq->GetItem(1).GetNestedDataSet();
        }
        const gdcm::DataElement *de = s_find(*ds, tag);
        if (!de || de->IsEmpty()) {
            static const uint8_t none = 0;
            if (!de)
                return 0;
            *data = &none; /* present, zero length */
            return 1;
        }
        const gdcm::ByteValue *bv = de->GetByteValue();
        if (!bv)
            return 0; /* a sequence or fragments */
        *data = reinterpret_cast<const uint8_t *>(bv->GetPointer());
        *len = bv->GetLength();
        return 1;
    } catch (...) {
        return 0;
    }
}

extern "C" const char *mm_gdcm_transfer_syntax(const mm_gdcm_file *f) { return f->ts.c_str(); }

extern "C" int mm_gdcm_encapsulated(const mm_gdcm_file *f) {
    try {
        const gdcm::DataElement *de = s_find(f->reader.GetFile().GetDataSet(), 0x7fe00010u);
        return de && de->GetSequenceOfFragments() != nullptr;
    } catch (...) {
        return 0;
    }
}

/* One codec on the Pixel Data element de, told exactly what px says. The
 * output is copied into dst up to dstlen (GDCM's own Bitmap::GetBuffer
 * copies the codec's whole output, and falls back to its PVRG codec, which
 * writes the data to a temporary file for an external program: never used
 * here). */
template <class Codec>
static int s_run(Codec &codec, const gdcm::TransferSyntax &ts, const char *ts_uid,
                 const mm_gdcm_pixels *px, const gdcm::DataElement &de, uint8_t *dst, size_t dstlen,
                 size_t *written, char *err, size_t errlen) {
    if (!codec.CanDecode(ts))
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: transfer syntax %.64s is not one GDCM's codec decodes", ts_uid);
    unsigned int dims[3] = {px->cols, px->rows, px->frames};
    codec.SetNumberOfDimensions(px->frames > 1 ? 3 : 2);
    codec.SetDimensions(dims);
    codec.SetPlanarConfiguration(px->planar);
    codec.SetPhotometricInterpretation(gdcm::PhotometricInterpretation(
        gdcm::PhotometricInterpretation::GetPIType(px->photometric)));
    gdcm::PixelFormat pf(uint16_t(px->samples), uint16_t(px->bits_allocated),
                         uint16_t(px->bits_stored), uint16_t(px->high_bit),
                         uint16_t(px->pixel_representation));
    codec.SetPixelFormat(pf);
    codec.SetNeedOverlayCleanup(false);
    gdcm::DataElement out;
    if (!codec.Decode(de, out))
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: GDCM could not decode the %.64s pixel data (corrupt, or "
                         "inconsistent with the header)",
                         ts_uid);
    if (codec.GetPixelFormat().GetBitsAllocated() != pf.GetBitsAllocated() ||
        codec.GetPixelFormat().GetSamplesPerPixel() != pf.GetSamplesPerPixel())
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: the codestream holds %u samples of %u bits a pixel, the "
                         "header says %u of %u",
                         unsigned(codec.GetPixelFormat().GetSamplesPerPixel()),
                         unsigned(codec.GetPixelFormat().GetBitsAllocated()), px->samples,
                         px->bits_allocated);
    const gdcm::ByteValue *bv = out.GetByteValue();
    if (!bv)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: the codec produced no pixels");
    size_t got = size_t(uint32_t(bv->GetLength()));
    size_t n = got < dstlen ? got : dstlen;
    memcpy(dst, bv->GetPointer(), n);
    *written = n;
    return MM_OK;
}

/* Decode the Pixel Data element de (encapsulated) as px describes. */
static int s_decode(const char *ts_uid, const mm_gdcm_pixels *px, const gdcm::DataElement &de,
                    uint8_t *dst, size_t dstlen, size_t *written, char *err, size_t errlen) {
    gdcm::TransferSyntax::TSType tst = gdcm::TransferSyntax::GetTSType(ts_uid);
    gdcm::TransferSyntax ts(tst);
    if (tst == gdcm::TransferSyntax::TS_END || !ts.IsEncapsulated())
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: transfer syntax %.64s is not one GDCM can decompress", ts_uid);
    gdcm::JPEG2000Codec j2k;
    if (j2k.CanDecode(ts))
        return s_run(j2k, ts, ts_uid, px, de, dst, dstlen, written, err, errlen);
    gdcm::JPEGLSCodec jls;
    if (jls.CanDecode(ts))
        return s_run(jls, ts, ts_uid, px, de, dst, dstlen, written, err, errlen);
    gdcm::JPEGCodec c; /* baseline, extended, lossless; s_run refuses anything else */
    return s_run(c, ts, ts_uid, px, de, dst, dstlen, written, err, errlen);
}

#define S_CATCH_ALL                                                                                \
    catch (const std::bad_alloc &) {                                                               \
        return mm_errorf(err, errlen, MM_ENOMEM, "dicom: out of memory while decoding");           \
    }                                                                                              \
    catch (const std::exception &e) {                                                              \
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: decoding failed (%.160s)", e.what());     \
    }                                                                                              \
    catch (...) {                                                                                  \
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: decoding failed");                        \
    }

extern "C" int mm_gdcm_decode(const mm_gdcm_file *f, const mm_gdcm_pixels *px, uint8_t *dst,
                              size_t dstlen, size_t *written, char *err, size_t errlen) {
    *written = 0;
    try {
        const gdcm::DataElement *de = s_find(f->reader.GetFile().GetDataSet(), 0x7fe00010u);
        if (!de || !de->GetSequenceOfFragments())
            return mm_errorf(err, errlen, MM_EPROTO, "dicom: no encapsulated Pixel Data");
        return s_decode(f->ts.c_str(), px, *de, dst, dstlen, written, err, errlen);
    }
    S_CATCH_ALL
}

extern "C" int mm_gdcm_decode_fragment(const char *ts_uid, const mm_gdcm_pixels *px,
                                       const uint8_t *frag, size_t len, uint8_t *dst, size_t dstlen,
                                       size_t *written, char *err, size_t errlen) {
    *written = 0;
    quiet_gdcm();
    if (len > 0xfffffffeu)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: a %zu-byte fragment", len);
    try {
        gdcm::SmartPointer<gdcm::SequenceOfFragments> sq = new gdcm::SequenceOfFragments;
        gdcm::Fragment fr;
        fr.SetByteValue(reinterpret_cast<const char *>(frag), gdcm::VL(uint32_t(len)));
        sq->AddFragment(fr);
        gdcm::DataElement de(gdcm::Tag(0x7fe0, 0x0010));
        de.SetValue(*sq);
        return s_decode(ts_uid, px, de, dst, dstlen, written, err, errlen);
    }
    S_CATCH_ALL
}

"""Word pools for the demo web: page titles and prose, and alt texts that do not describe the image.

Kept apart from the generator so the generator reads as logic. Every string here must be
representable in the page charsets the generator uses for its language (Latin-1 for de/fr/es,
Shift_JIS/EUC-JP for ja; characters outside them are written as numeric character references).
"""

from __future__ import annotations

SITE_NAME = "ShapeWorld"

TITLES: dict[str, list[str]] = {
    "en": ["Learning shapes and colours", "Gallery: geometric drawings", "Art class worksheet", "Shapes for kids",
           "Poster shop: bold geometry", "How to draw a perfect star", "Counting with colours", "Weekly drawing challenge"],
    "de": ["Formen und Farben lernen", "Galerie: geometrische Zeichnungen", "Arbeitsblatt für den Kunstunterricht",
           "Formen für Kinder", "Plakate mit kräftiger Geometrie", "So zeichnet man einen Stern", "Zählen mit Farben"],
    "fr": ["Apprendre les formes et les couleurs", "Galerie : dessins géométriques", "Fiche d'arts plastiques",
           "Les formes pour les enfants", "Affiches géométriques", "Comment dessiner une étoile", "Compter avec les couleurs"],
    "es": ["Aprender formas y colores", "Galería: dibujos geométricos", "Ficha de educación artística",
           "Formas para niños", "Carteles de geometría", "Cómo dibujar una estrella", "Contar con colores"],
    "ja": ["図形と色を学ぼう", "ギャラリー：幾何学模様のイラスト", "図工の授業のワークシート", "子ども向けの図形あそび",
           "幾何学ポスターのお店", "きれいな星の描き方", "色をつかって数えよう"],
}

SENTENCES: dict[str, list[str]] = {
    "en": [
        "Simple shapes are the first thing children learn to draw, and they never stop being useful.",
        "In this lesson we look at how colour and repetition change the way a picture feels.",
        "Each drawing below was made with a ruler, a compass and a handful of bright markers.",
        "Try to count the shapes in every picture before you read the caption underneath.",
        "Our students voted for their favourite poster at the end of the term.",
        "A strong background makes even a small figure stand out on the page.",
        "You can print these worksheets for free and use them in your classroom.",
        "Don’t worry if your first star looks a little uneven; practice makes it better.",
        "The gallery is updated every week with new drawings sent in by our readers.",
        "Geometry is everywhere: in tiles, in flags, in road signs and in paintings.",
    ],
    "de": [
        "Einfache Formen sind das Erste, was Kinder zeichnen lernen, und sie bleiben immer nützlich.",
        "In dieser Lektion sehen wir uns an, wie Farbe und Wiederholung die Wirkung eines Bildes verändern.",
        "Jede Zeichnung unten entstand mit Lineal, Zirkel und ein paar kräftigen Filzstiften.",
        "Zählen Sie die Formen in jedem Bild, bevor Sie die Bildunterschrift lesen.",
        "Am Ende des Schuljahres haben unsere Schüler über ihr Lieblingsplakat abgestimmt.",
        "Ein kräftiger Hintergrund lässt auch eine kleine Figur deutlich hervortreten.",
        "Die Arbeitsblätter können Sie kostenlos ausdrucken und im Unterricht verwenden.",
        "Die Galerie wird jede Woche mit neuen Zeichnungen unserer Leserinnen und Leser ergänzt.",
        "Geometrie ist überall: in Fliesen, Flaggen, Verkehrsschildern und Gemälden.",
    ],
    "fr": [
        "Les formes simples sont la première chose que les enfants apprennent à dessiner.",
        "Dans cette leçon, nous regardons comment la couleur et la répétition changent une image.",
        "Chaque dessin ci-dessous a été réalisé avec une règle, un compas et quelques feutres vifs.",
        "Essayez de compter les formes de chaque image avant de lire la légende.",
        "À la fin du trimestre, nos élèves ont voté pour leur affiche préférée.",
        "Un fond contrasté fait ressortir même une petite figure sur la page.",
        "Vous pouvez imprimer ces fiches gratuitement et les utiliser en classe.",
        "La galerie est mise à jour chaque semaine avec les dessins envoyés par nos lecteurs.",
        "La géométrie est partout : dans les carreaux, les drapeaux et les panneaux routiers.",
    ],
    "es": [
        "Las formas simples son lo primero que los niños aprenden a dibujar.",
        "En esta lección vemos cómo el color y la repetición cambian la sensación de una imagen.",
        "Cada dibujo de abajo se hizo con una regla, un compás y unos rotuladores de colores vivos.",
        "Intenta contar las figuras de cada imagen antes de leer el pie de foto.",
        "Al final del trimestre, nuestros alumnos votaron por su cartel favorito.",
        "Un fondo fuerte hace que incluso una figura pequeña destaque en la página.",
        "Puedes imprimir estas fichas gratis y usarlas en tu aula.",
        "La galería se actualiza cada semana con dibujos enviados por nuestros lectores.",
        "La geometría está en todas partes: en azulejos, banderas y señales de tráfico.",
    ],
    "ja": [
        "簡単な図形は、子どもが最初に描けるようになるものです。",
        "このレッスンでは、色とくり返しが絵の印象をどう変えるかを見ていきます。",
        "下の絵はすべて、定規とコンパスと明るいマーカーで描きました。",
        "説明を読む前に、それぞれの絵の図形を数えてみましょう。",
        "学期の終わりに、生徒たちがお気に入りのポスターに投票しました。",
        "背景の色がはっきりしていると、小さな図形も目立ちます。",
        "このワークシートは無料で印刷して、授業で使うことができます。",
        "ギャラリーは毎週、読者から届いた新しい絵で更新されます。",
        "幾何学はどこにでもあります。タイルにも、旗にも、道路標識にも。",
    ],
}

# Alt texts of at least five characters that say nothing about what the image shows.
GENERIC_ALTS: dict[str, list[str]] = {
    "en": ["Click to enlarge", "Product photo", "Our team at the spring workshop", "Banner image", "Thumbnail",
           "IMG_4021.JPG", "DSC00123", "Untitled design", "Screenshot 2021-05-14 at 10.32.11", "View gallery",
           "Photo by Anna K.", "Download the worksheet", "Children’s art class", "Don’t miss our summer sale"],
    "de": ["Zum Vergrößern klicken", "Produktfoto", "Unser Team beim Sommerfest", "Titelbild", "Vorschaubild",
           "Foto: privat", "Bildergalerie öffnen", "Arbeitsblatt herunterladen", "Anfahrt & Öffnungszeiten"],
    "fr": ["Cliquez pour agrandir", "Photo du produit", "Notre équipe à l'atelier", "Image d'en-tête", "Miniature",
           "Télécharger la fiche", "Crédit photo : Marie D.", "Voir la galerie"],
    "es": ["Haz clic para ampliar", "Foto del producto", "Nuestro equipo en el taller", "Imagen de cabecera",
           "Miniatura", "Descargar la ficha", "Foto: Juan P.", "Ver la galería"],
    "ja": ["クリックで拡大します", "商品写真のサンプル", "ワークショップの様子", "ヘッダー画像です", "ギャラリーを見る",
           "ワークシートをダウンロード", "撮影：山田さん"],
}

# Alt texts shorter than five characters: LAION drops them.
SHORT_ALTS: dict[str, list[str]] = {
    "en": ["logo", "img", "pic", "icon", "1"],
    "de": ["Bild", "Foto", "Logo"],
    "fr": ["logo", "img", "pdf"],
    "es": ["foto", "img", "logo"],
    "ja": ["画像", "写真", "図1", "ロゴ"],
}

# Prefixes a caption sometimes carries ("Figure 2: two red circles ..."): still a matching alt.
CAPTION_PREFIXES: dict[str, list[str]] = {
    "en": ["Figure 2: ", "Worksheet: ", "Example: "],
    "de": ["Abbildung 2: ", "Beispiel: "],
    "fr": ["Figure 2 : ", "Exemple : "],
    "es": ["Figura 2: ", "Ejemplo: "],
    "ja": ["図2：", "例："],
}

LOGO_ALTS: dict[str, str] = {
    "en": f"{SITE_NAME} logo", "de": f"{SITE_NAME} – Formen & Farben", "fr": f"Logo de {SITE_NAME}",
    "es": f"Logotipo de {SITE_NAME}", "ja": f"{SITE_NAME} ロゴ",
}

NAV_LABELS: dict[str, tuple[str, str]] = {
    "en": ("Home", "More"), "de": ("Startseite", "Mehr"), "fr": ("Accueil", "Plus"), "es": ("Inicio", "Más"),
    "ja": ("ホーム", "もっと見る"),
}

SLUG_WORDS: dict[str, list[str]] = {
    "en": ["shapes", "colours", "worksheet", "gallery", "poster", "stars", "counting", "drawing"],
    "de": ["formen", "farben", "arbeitsblatt", "galerie", "plakat", "sterne", "zaehlen", "zeichnen"],
    "fr": ["formes", "couleurs", "fiche", "galerie", "affiche", "etoiles", "compter", "dessin"],
    "es": ["formas", "colores", "ficha", "galeria", "cartel", "estrellas", "contar", "dibujo"],
    "ja": ["zukei", "iro", "sheet", "gallery", "poster", "hoshi", "kazoeru", "e"],
}
